// The CPU ops' argument structs and the per-ISA entry points (csrc/cpu/kernels/ops.cpp is compiled
// once per ISA into namespaces sstm::avx512, sstm::avx2, sstm::generic; dispatch.cpp picks one).
//
// Tensors arrive as raw pointers, a dtype code (csrc/common/numeric.h: 0 fp32, 1 bf16, 2 fp16),
// sizes and strides in elements; kernels read them through the strides, so non-contiguous views
// need no copy. Outputs are fp32, contiguous, and allocated (and zeroed where stated) by the caller.
#pragma once
#include <cstdint>

namespace sstm {

struct Tensor {
  const void* ptr = nullptr;
  int dt = 0;
  int ndim = 0;
  int64_t size[4] = {0, 0, 0, 0};
  int64_t stride[4] = {0, 0, 0, 0};
};

// out[O, I] (fp32, contiguous, zeroed by the caller) = sum_b G_b * G_b,
// G_b = sum_t mask[b, t] g[b, t]^T x[b, t]. x [B, T, I], g [B, T, O]; mask fp32 [B, T] contiguous
// or nullptr.
using DiagFisherFn = void (*)(float* out, const Tensor& x, const Tensor& g, const float* mask,
                              int nthreads);
// out[B, m_o, m_i] (fp32, contiguous) = sum_t mask[b, t] (q_out^T g[b, t]) (q_in^T x[b, t])^T.
using SubspaceGradsFn = void (*)(float* out, const Tensor& x, const Tensor& g, const Tensor& q_in,
                                 const Tensor& q_out, const float* mask, int nthreads);
// out[d, d] = sum_n mask[n] y_n y_n^T with y_n = x_n (q == nullptr) or q^T x_n. x [N, I].
using KfacFactorFn = void (*)(float* out, const Tensor& x, const float* mask, const Tensor* q,
                              int nthreads);
// out[I, l] = sum_n mask[n] x_n (x_n^T omega). x [N, I], omega [I, l].
using KfacSketchFn = void (*)(float* out, const Tensor& x, const Tensor& omega, const float* mask,
                              int nthreads);
// In place w[O, I] <- round(w + scale * b @ a), product and sum in fp32, one rounding.
using LoraMergeFn = void (*)(const Tensor& w, const Tensor& b, const Tensor& a, float scale,
                             int nthreads);

struct OpTable {
  const char* isa;
  DiagFisherFn diag_fisher_linear;
  SubspaceGradsFn subspace_grads;
  KfacFactorFn kfac_factor;
  KfacSketchFn kfac_sketch;
  LoraMergeFn lora_merge;
};

#define SSTM_DECLARE_ISA(NS)                                                                    \
  namespace NS {                                                                                \
  const char* isa_name();                                                                       \
  void diag_fisher_linear(float*, const Tensor&, const Tensor&, const float*, int);            \
  void subspace_grads(float*, const Tensor&, const Tensor&, const Tensor&, const Tensor&,      \
                      const float*, int);                                                       \
  void kfac_factor(float*, const Tensor&, const float*, const Tensor*, int);                  \
  void kfac_sketch(float*, const Tensor&, const Tensor&, const float*, int);                  \
  void lora_merge(const Tensor&, const Tensor&, const Tensor&, float, int);                   \
  }

SSTM_DECLARE_ISA(avx512)
SSTM_DECLARE_ISA(avx2)
SSTM_DECLARE_ISA(generic)

}  // namespace sstm
