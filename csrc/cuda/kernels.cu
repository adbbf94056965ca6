// CUDA kernels of sstmerge: three tiled kernels over the tile math of common/tile_math.h.
//
//   diag_fisher_kernel  F = sum_b G_b * G_b, G_b = g_b^T diag(mask_b) x_b, one G_b tile at a time
//                       (compute-bound: 2*B*T*O*I flops, like the weight-gradient GEMM)
//   gram_kernel         out[z] = A_z^T diag(w_z) B_z over a row range: kfac_factor, kfac_sketch,
//                       the per-sample product of subspace_grads, and the projections x @ q
//                       (compute-bound for wide outputs, memory-bound for thin ones)
//   lora_merge_kernel   w <- round(w + scale * b @ a), in place (memory-bound: one read and one
//                       write of w)
//
// Only launch, shared memory and synchronisation live here; the per-thread work is the SSTM_HD
// code of common/tile_math.h, which the CPU build compiles and tests too. Kernels launch on the
// stream passed from Python (torch's current stream); every launcher returns nullptr on success or
// the CUDA error string.
#include <cuda_runtime.h>

#include <cstdint>

#include "common/kernel_args.h"
#include "common/numeric.h"
#include "common/tile_math.h"
#include "cuda/launch.h"

namespace sstm {
namespace {

using tile::kMicro;
using tile::kRows;
using tile::kStageSize;
using tile::kThreads;
using tile::kTile;
using tile::RowWeights;
using tile::View;

// acc += A[r_begin:r_end, i0:i0+kTile]^T diag(w) B[r_begin:r_end, j0:j0+kTile], chunk by chunk.
__device__ void accumulate(float (&acc)[kMicro][kMicro], float* As, float* Bs, const View& a,
                           const View& b, RowWeights w, int64_t r_begin, int64_t r_end,
                           int64_t i0, int64_t j0) {
  const int tid = static_cast<int>(threadIdx.x);
  for (int64_t r0 = r_begin; r0 < r_end; r0 += kRows) {
    tile::stage_chunk(As, a, w, r0, r_end, i0, tid);
    tile::stage_chunk(Bs, b, RowWeights{nullptr, 0}, r0, r_end, j0, tid);
    __syncthreads();
    tile::micro_step(acc, As, Bs, tid);
    __syncthreads();
  }
}

// Block (x, y) owns tile (x, y) of F [O, I]; samples one after the other, one G_b tile at a time.
__global__ void __launch_bounds__(kThreads) diag_fisher_kernel(FisherArgs p) {
  __shared__ float As[kStageSize];
  __shared__ float Bs[kStageSize];
  const int tid = static_cast<int>(threadIdx.x);
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t j0 = static_cast<int64_t>(blockIdx.y) * kTile;
  float fisher[kMicro][kMicro], grad[kMicro][kMicro];
  tile::zero(fisher);
  for (int64_t b = 0; b < p.batch; ++b) {
    tile::zero(grad);
    const RowWeights mb{p.mask.w ? p.mask.w + b * p.mask_sb : nullptr, p.mask.ws};
    accumulate(grad, As, Bs, tile::offset_view(p.g, b * p.g_sb), tile::offset_view(p.x, b * p.x_sb),
               mb, 0, p.g.rows, i0, j0);
    tile::add_square(fisher, grad);
  }
  tile::store_tile(p.out, p.x.cols, 1, p.g.cols, p.x.cols, i0, j0, fisher, tid, false);
}

// Block (x, y, z) owns tile (x, y) of out[z]; z = n * splits + s (batch n, row split s).
__global__ void __launch_bounds__(kThreads) gram_kernel(GramArgs p) {
  if (p.symmetric && blockIdx.y < blockIdx.x) return;  // whole block, before any __syncthreads
  __shared__ float As[kStageSize];
  __shared__ float Bs[kStageSize];
  const int tid = static_cast<int>(threadIdx.x);
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t j0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const int64_t n = blockIdx.z / p.splits;
  const int64_t s = blockIdx.z % p.splits;
  const int64_t r_begin = s * p.rows_per_split;
  const int64_t r_end = tile::split_end(r_begin, p.rows_per_split, p.a.rows);
  const RowWeights wn{p.w.w ? p.w.w + n * p.w_sb : nullptr, p.w.ws};
  float acc[kMicro][kMicro];
  tile::zero(acc);
  accumulate(acc, As, Bs, tile::offset_view(p.a, n * p.a_sb), tile::offset_view(p.b, n * p.b_sb),
             wn, r_begin, r_end, i0, j0);
  const int64_t M = p.a.cols, L = p.b.cols;
  tile::store_tile(p.out + static_cast<int64_t>(blockIdx.z) * M * L, L, 1, M, L, i0, j0, acc, tid,
                   p.symmetric && blockIdx.y > blockIdx.x);
}

// Block (x, y) owns tile (x, y) of w [O, I]: the rank-K product tile in fp32, then one rounding.
__global__ void __launch_bounds__(kThreads) lora_merge_kernel(MergeArgs p) {
  __shared__ float As[kStageSize];
  __shared__ float Bs[kStageSize];
  const int tid = static_cast<int>(threadIdx.x);
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t j0 = static_cast<int64_t>(blockIdx.y) * kTile;
  float acc[kMicro][kMicro];
  tile::zero(acc);
  accumulate(acc, As, Bs, p.bt, p.a, RowWeights{nullptr, 0}, 0, p.bt.rows, i0, j0);
  tile::merge_tile(p.w, p.w_dt, p.w_so, p.w_si, p.bt.cols, p.a.cols, i0, j0, acc, p.scale, tid);
}

const char* prepare(int device) {
  cudaError_t e = cudaSetDevice(device);
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

const char* launched() {
  cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

dim3 grid_of(int64_t gx, int64_t gy, int64_t gz) {
  return dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy), static_cast<unsigned>(gz));
}

}  // namespace

const char* launch_diag_fisher(const FisherArgs& p, int device, uintptr_t stream) {
  if (p.g.cols == 0 || p.x.cols == 0) return nullptr;
  if (const char* err = check(p)) return err;
  if (const char* err = prepare(device)) return err;
  diag_fisher_kernel<<<grid_of(n_tiles(p.g.cols), n_tiles(p.x.cols), 1), kThreads, 0,
                       reinterpret_cast<cudaStream_t>(stream)>>>(p);
  return launched();
}

const char* launch_gram(const GramArgs& p, int device, uintptr_t stream) {
  if (p.a.cols == 0 || p.b.cols == 0 || p.batch == 0) return nullptr;
  if (const char* err = check(p)) return err;
  if (const char* err = prepare(device)) return err;
  gram_kernel<<<grid_of(n_tiles(p.a.cols), n_tiles(p.b.cols), p.batch * p.splits), kThreads, 0,
                reinterpret_cast<cudaStream_t>(stream)>>>(p);
  return launched();
}

const char* launch_lora_merge(const MergeArgs& p, int device, uintptr_t stream) {
  if (p.bt.cols == 0 || p.a.cols == 0) return nullptr;
  if (const char* err = check(p)) return err;
  if (const char* err = prepare(device)) return err;
  lora_merge_kernel<<<grid_of(n_tiles(p.bt.cols), n_tiles(p.a.cols), 1), kThreads, 0,
                      reinterpret_cast<cudaStream_t>(stream)>>>(p);
  return launched();
}

#define SSTM_STR2(...) #__VA_ARGS__
#define SSTM_STR(...) SSTM_STR2(__VA_ARGS__)
const char* built_archs() {
#ifdef __CUDA_ARCH_LIST__
  return SSTM_STR(__CUDA_ARCH_LIST__);
#else
  return "unknown";
#endif
}

}  // namespace sstm
