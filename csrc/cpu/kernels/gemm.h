// The shared compute core of the CPU ops: C (+)= A^T diag(w) B over a list of k rows, with
// packing (dtype conversion, mask weights, strided gathers) and a register-blocked micro-kernel.
//
//   C[m, n] = sum_k w_k A[k, m] B[k, n]      A[k, m] = a_base[a_off[k] + m * a_s]  (dtype a_dt)
//                                            B[k, n] = b_base[b_off[k] + n * b_s]  (dtype b_dt)
//
// The k rows are an explicit list of element offsets, so masked tokens are simply left out of the
// list (they cost nothing), and any batch/token strides reduce to offsets. Compute-bound: 2*M*N*K
// flops on MR x NR register tiles (simd.h) over packed panels; A and B are re-read once per block.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <omp.h>

#include "cpu/kernels/simd.h"

namespace sstm {
namespace SSTM_ISA {

// ---- aligned scratch ----
struct Buf {
  float* p = nullptr;
  explicit Buf(int64_t n) {
    size_t bytes = (size_t(std::max<int64_t>(n, 1)) * 4 + 63) / 64 * 64;
    p = static_cast<float*>(std::aligned_alloc(64, bytes));
    if (!p) throw std::bad_alloc();
  }
  ~Buf() { std::free(p); }
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
};

// ---- micro-kernel ----
enum Epi { kAdd = 0, kStore = 1, kSquareAdd = 2 };

// acc[MR x NR] = sum_{k<K} A[k, :]^T B[k, :] with A packed as K x MR and B as K x NR (64-byte
// aligned, zero-padded); then C[:mr, :nr] = acc / += acc / += acc * acc.
// pf[0, npf): cache lines to prefetch into L2 while computing, one every 4 k (the caller spreads the
// lines the next packing step will read over the calls, so that memory latency overlaps compute).
template <int EPI>
static inline void micro(int64_t K, const float* __restrict A, const float* __restrict B, float* C,
                         int64_t ldc, int mr, int nr, const char* const* pf = nullptr,
                         int64_t npf = 0) {
  vf acc[MR][NV];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) acc[i][j] = vf{};
  auto step = [&](int64_t k) __attribute__((always_inline)) {
    vf b[NV];
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) b[j] = *reinterpret_cast<const vf*>(B + k * NR + j * VW);
    const float* a = A + k * MR;
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      vf ai = vbcast(a[i]);
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) acc[i][j] += ai * b[j];
    }
  };
  if (EPI != kStore && mr == MR && nr == NR) {  // the C tile is read after the K loop: fetch it now
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) __builtin_prefetch(C + i * ldc + j * VW, 1, 3);
  }
  int64_t k = 0, ip = 0;
  for (; k + 4 <= K; k += 4) {
    if (ip < npf) __builtin_prefetch(pf[ip++], 0, 2);
    step(k);
    step(k + 1);
    step(k + 2);
    step(k + 3);
  }
  for (; k < K; ++k) step(k);
  for (; ip < npf; ++ip) __builtin_prefetch(pf[ip], 0, 2);
  if (mr == MR && nr == NR) {
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) {
        float* c = C + i * ldc + j * VW;
        if (EPI == kStore) {
          vstore(c, acc[i][j]);
        } else if (EPI == kAdd) {
          vstore(c, vload(c) + acc[i][j]);
        } else {
          vstore(c, vload(c) + acc[i][j] * acc[i][j]);
        }
      }
    return;
  }
  alignas(64) float t[MR][NR];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) *reinterpret_cast<vf*>(&t[i][j * VW]) = acc[i][j];
  for (int i = 0; i < mr; ++i)
    for (int j = 0; j < nr; ++j) {
      float v = t[i][j];
      float& c = C[i * ldc + j];
      c = EPI == kStore ? v : EPI == kAdd ? c + v : c + v * v;
    }
}

// ---- row micro-kernel: A read in place ----
// C[r, :] (= or +=) sum_{k<K} X_r[k] Bp[k, :] for r < mr, with the RM rows X_r given by pointers to
// fp32 runs contiguous along k (rows r >= mr are not read) and Bp packed K x NR. For row-major
// activations whose contiguous dim is the reduction (y = x Q): the broadcasts come straight from the
// rows, so x needs no transposed packing. RM x NV accumulators + NV B vectors + 1 broadcast fit the
// register file, and the RM row pointers the general-purpose registers.
constexpr int RM = VW == 16 ? 12 : 6;

template <bool ADD>
static inline void micro_rows(int64_t K, const float* const* X, const float* __restrict Bp, float* C,
                              int64_t ldc, int mr) {
  const float* x[RM];
#pragma GCC unroll 16
  for (int i = 0; i < RM; ++i) x[i] = X[i < mr ? i : 0];
  vf acc[RM][NV];
#pragma GCC unroll 16
  for (int i = 0; i < RM; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) acc[i][j] = vf{};
#pragma GCC unroll 2
  for (int64_t k = 0; k < K; ++k) {
    vf b[NV];
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) b[j] = *reinterpret_cast<const vf*>(Bp + k * NR + j * VW);
#pragma GCC unroll 16
    for (int i = 0; i < RM; ++i) {
      const vf xi = vbcast(x[i][k]);
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) acc[i][j] += xi * b[j];
    }
  }
  for (int i = 0; i < mr; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) {
      float* c = C + i * ldc + j * VW;
      vstore(c, ADD ? vload(c) + acc[i][j] : acc[i][j]);
    }
}

// ---- packing ----
// dst[(p * K + k) * P + j] = w_k * X[off[k] + (c0 + p * P + j) * s] for the n columns of the block,
// zero-padded to whole panels of width P. Converts the dtype and applies the mask weight once.
template <int P, int DT>
static void pack_t(float* __restrict dst, const void* base, const int64_t* off, const float* w,
                   int64_t K, int64_t s, int64_t c0, int64_t n) {
  const int64_t np = (n + P - 1) / P;
  if (s == 1) {  // rows contiguous along the panel: one run per (k, panel)
    for (int64_t k = 0; k < K; ++k) {
      const float wk = w ? w[k] : 1.0f;
      const void* row = elem(base, DT, off[k] + c0);
      for (int64_t p = 0; p < np; ++p) {
        float* d = dst + (p * K + k) * P;
        const int64_t cnt = std::min<int64_t>(P, n - p * P);
        if (cnt == P) {
          load_run<DT>(d, elem(row, DT, p * P), P, wk);
        } else {
          load_run<DT>(d, elem(row, DT, p * P), cnt, wk);
          for (int64_t j = cnt; j < P; ++j) d[j] = 0.0f;
        }
      }
    }
    return;
  }
  // strided along the panel: walk each column down the k list (contiguous when off[k] = k)
  for (int64_t p = 0; p < np; ++p) {
    const int64_t cnt = std::min<int64_t>(P, n - p * P);
    float* d = dst + p * K * P;
    for (int64_t j = 0; j < P; ++j) {
      if (j >= cnt) {
        for (int64_t k = 0; k < K; ++k) d[k * P + j] = 0.0f;
        continue;
      }
      const int64_t col = (c0 + p * P + j) * s;
      for (int64_t k = 0; k < K; ++k) {
        const float wk = w ? w[k] : 1.0f;
        d[k * P + j] = wk * load_f32(base, off[k] + col, DT);
      }
    }
  }
}

template <int P>
static void pack(float* dst, const void* base, int dt, const int64_t* off, const float* w, int64_t K,
                 int64_t s, int64_t c0, int64_t n) {
  if (dt == kFloat32) return pack_t<P, kFloat32>(dst, base, off, w, K, s, c0, n);
  if (dt == kBFloat16) return pack_t<P, kBFloat16>(dst, base, off, w, K, s, c0, n);
  return pack_t<P, kFloat16>(dst, base, off, w, K, s, c0, n);
}

// ---- generic driver ----
struct Operand {
  const void* base;
  int dt;
  int64_t s;  // element stride along m (for A) or n (for B)
};
struct KRows {
  int64_t K;
  const int64_t* a_off;
  const int64_t* b_off;
  const float* w;  // per-k weight applied to A (nullptr = 1)
};

constexpr int64_t GEMM_KC = 256;
constexpr int64_t GEMM_MCP = 16;  // panels of MR per block
constexpr int64_t GEMM_NCP = 8;   // panels of NR per block

// C[M, N] (ldc) = (accumulate ? C : 0) + sum_k w_k A[k, :]^T B[k, :]. upper: only tiles that touch
// the upper triangle (col >= row) are computed (for symmetric results; the caller mirrors).
// Runs on up to nthreads OpenMP threads (1 = in the calling thread).
static void gemm_atb(int64_t M, int64_t N, const KRows& kr, const Operand& A, const Operand& B,
                     float* C, int64_t ldc, bool accumulate, bool upper, int nthreads) {
  if (M <= 0 || N <= 0) return;
  if (!accumulate)
    for (int64_t i = 0; i < M; ++i) memset(C + i * ldc, 0, size_t(N) * 4);
  if (kr.K <= 0) return;
  const int64_t MC = GEMM_MCP * MR, NC = GEMM_NCP * NR;
  const int64_t mb = (M + MC - 1) / MC, nb = (N + NC - 1) / NC, nblk = mb * nb;
  const int nt = int(std::max<int64_t>(1, std::min<int64_t>(nthreads, nblk)));
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    Buf abuf(GEMM_KC * MC), bbuf(GEMM_KC * NC);
#pragma omp for schedule(dynamic, 1)
    for (int64_t blk = 0; blk < nblk; ++blk) {
      const int64_t m0 = (blk / nb) * MC, n0 = (blk % nb) * NC;
      const int64_t mc = std::min(MC, M - m0), nc = std::min(NC, N - n0);
      if (upper && n0 + nc - 1 < m0) continue;
      const int64_t np = (mc + MR - 1) / MR, nq = (nc + NR - 1) / NR;
      for (int64_t k0 = 0; k0 < kr.K; k0 += GEMM_KC) {
        const int64_t kc = std::min(GEMM_KC, kr.K - k0);
        pack<MR>(abuf.p, A.base, A.dt, kr.a_off + k0, kr.w ? kr.w + k0 : nullptr, kc, A.s, m0, mc);
        pack<NR>(bbuf.p, B.base, B.dt, kr.b_off + k0, nullptr, kc, B.s, n0, nc);
        for (int64_t q = 0; q < nq; ++q) {
          const int nr = int(std::min<int64_t>(NR, nc - q * NR));
          for (int64_t p = 0; p < np; ++p) {
            const int mr = int(std::min<int64_t>(MR, mc - p * MR));
            if (upper && n0 + q * NR + nr - 1 < m0 + p * MR) continue;
            micro<kAdd>(kc, abuf.p + p * kc * MR, bbuf.p + q * kc * NR,
                        C + (m0 + p * MR) * ldc + n0 + q * NR, ldc, mr, nr);
          }
        }
      }
    }
  }
}

// Copy the upper triangle of the square C[n, n] onto the lower one.
static inline void mirror_upper(float* C, int64_t n, int64_t ldc) {
  for (int64_t i = 1; i < n; ++i)
    for (int64_t j = 0; j < i; ++j) C[i * ldc + j] = C[j * ldc + i];
}

}  // namespace SSTM_ISA
}  // namespace sstm
