// The five CPU ops, compiled once per ISA (namespace sstm::SSTM_ISA). Math in csrc/cpu/ops.h and
// python/sstmerge/ops/*.py; every op accumulates in fp32 whatever the input dtype.
#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu/kernels/amx.h"
#include "cpu/kernels/gemm.h"
#include "cpu/ops.h"

namespace sstm {
namespace SSTM_ISA {

namespace {

// Active (mask != 0) tokens of each sample b of a [B, T, *] pair: their element offsets in x and g
// and their mask weights, packed at [b * T, b * T + count[b]).
struct TokenLists {
  std::vector<int64_t> xo, go, count;
  std::vector<float> w;
  TokenLists(const Tensor& x, const Tensor& g, const float* mask) {
    const int64_t B = x.size[0], T = x.size[1];
    xo.resize(size_t(B * T));
    go.resize(size_t(B * T));
    w.resize(size_t(B * T));
    count.assign(size_t(B), 0);
    for (int64_t b = 0; b < B; ++b) {
      int64_t c = 0;
      for (int64_t t = 0; t < T; ++t) {
        const float m = mask ? mask[b * T + t] : 1.0f;
        if (m == 0.0f) continue;  // a masked token costs nothing
        xo[b * T + c] = b * x.stride[0] + t * x.stride[1];
        go[b * T + c] = b * g.stride[0] + t * g.stride[1];
        w[b * T + c] = m;
        ++c;
      }
      count[b] = c;
    }
  }
};

// Split `panels` panels into blocks of at most `maxp` panels, the block count a multiple of nt
// where that costs little, so that nt threads get equal work.
int64_t block_panels(int64_t panels, int64_t maxp, int nt) {
  int64_t nblk = (panels + maxp - 1) / maxp;
  if (nt > 1 && panels >= nt) nblk = (nblk + nt - 1) / nt * nt;
  return (panels + nblk - 1) / nblk;
}

// The cache lines of `rows` rows (row k at base + off[k] * esize, `bytes` long), appended to `out`:
// what the next packing step will read, for micro-kernel calls to prefetch while they compute.
void row_lines(std::vector<const char*>& out, const void* base, const int64_t* off, int64_t rows,
               int64_t bytes, int64_t esize) {
  const char* p = static_cast<const char*>(base);
  for (int64_t r = 0; r < rows; ++r) {
    const char* row = p + off[r] * esize;
    const char* first = reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(row) & ~uintptr_t(63));
    for (const char* l = first; l < row + bytes; l += 64) out.push_back(l);
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// diag_fisher_linear: out[O, I] += sum_b G_b * G_b, G_b = g_b^T diag(mask_b) x_b.
// Compute-bound (2*B*T*O*I flops). Each thread owns [MC x NC] blocks of out (kept in L2 across all
// samples) and, per sample, packs the g_b / x_b panels of that block and runs the micro-kernel over
// the whole token range with the epilogue F += acc * acc: G_b's tile is squared while it is still in
// registers, so no G_b ever exists in memory (extra memory: the packed panels, O(T * (MC + NC))).
// With more than DF_KC active tokens, G_b's block is accumulated in an [MC x NC] scratch first.
// Memory: the strided g/x rows are latency-bound to pack (measured ~1 ns/element from memory vs
// 0.13 from L2), so while sample b computes, its micro-kernel calls prefetch sample b+1's rows of
// the block into L2 (a few lines per call), and each call prefetches its F tile before the K loop.
// Single-thread CPU time on the section 8 problem (AVX-512): ~37 ms vs torch's GEMM ~30-32 ms.
// ---------------------------------------------------------------------------------------------
constexpr int64_t DF_KC = 384;
constexpr int64_t DF_MCP = (MR >= 14) ? 37 : 32;  // 2 x 2 blocks of out at 1024 x 1024 (fewer re-packs)
constexpr int64_t DF_NCP = (NR >= 32) ? 16 : 32;

void diag_fisher_linear(float* out, const Tensor& x, const Tensor& g, const float* mask,
                        int nthreads) {
  const int64_t B = x.size[0], T = x.size[1], I = x.size[2], O = g.size[2];
  if (B == 0 || T == 0 || I == 0 || O == 0) return;
  TokenLists tl(x, g, mask);
  const int nt = std::max(1, nthreads);
  const int64_t mcp = block_panels((O + MR - 1) / MR, DF_MCP, 1);
  const int64_t ncp = block_panels((I + NR - 1) / NR, DF_NCP, nt);
  const int64_t MC = mcp * MR, NC = ncp * NR;
  const int64_t mb = (O + MC - 1) / MC, nb = (I + NC - 1) / NC, nblk = mb * nb;
  const int64_t kmax = std::min<int64_t>(T, DF_KC);
  const int64_t gs = g.stride[2], xs = x.stride[2];
#pragma omp parallel num_threads(int(std::min<int64_t>(nt, nblk))) if (nt > 1 && nblk > 1)
  {
    Buf abuf(kmax * MC), bbuf(kmax * NC);
    Buf gbuf(T > DF_KC ? MC * NC : 1);
    std::vector<const char*> lines;
#pragma omp for schedule(dynamic, 1)
    for (int64_t blk = 0; blk < nblk; ++blk) {
      const int64_t o0 = (blk / nb) * MC, i0 = (blk % nb) * NC;
      const int64_t mc = std::min(MC, O - o0), nc = std::min(NC, I - i0);
      const int64_t np = (mc + MR - 1) / MR, nq = (nc + NR - 1) / NR;
      float* F = out + o0 * I + i0;
      const int64_t ges = g.dt == kFloat32 ? 4 : 2, xes = x.dt == kFloat32 ? 4 : 2;
      const bool can_prefetch = gs == 1 && xs == 1;
      for (int64_t b = 0; b < B; ++b) {
        const int64_t K = tl.count[b];
        if (K == 0) continue;
        const bool single = K <= DF_KC;
        // the next sample with tokens: its rows of this block are prefetched while this one computes
        lines.clear();
        int64_t per_call = 0;
        if (can_prefetch && single) {
          int64_t bn = b + 1;
          while (bn < B && tl.count[bn] == 0) ++bn;
          if (bn < B) {
            const int64_t kn = std::min(tl.count[bn], DF_KC);
            row_lines(lines, elem(g.ptr, g.dt, o0), tl.go.data() + bn * T, kn, mc * ges, ges);
            row_lines(lines, elem(x.ptr, x.dt, i0), tl.xo.data() + bn * T, kn, nc * xes, xes);
            per_call = int64_t(lines.size()) / (np * nq) + 1;
          }
        }
        int64_t pfi = 0;
        for (int64_t k0 = 0; k0 < K; k0 += DF_KC) {
          const int64_t kc = std::min(DF_KC, K - k0);
          const size_t base = size_t(b * T + k0);
          pack<MR>(abuf.p, g.ptr, g.dt, tl.go.data() + base, tl.w.data() + base, kc, gs, o0, mc);
          pack<NR>(bbuf.p, x.ptr, x.dt, tl.xo.data() + base, nullptr, kc, xs, i0, nc);
          for (int64_t q = 0; q < nq; ++q) {
            const int nr = int(std::min<int64_t>(NR, nc - q * NR));
            const float* bp = bbuf.p + q * kc * NR;
            for (int64_t p = 0; p < np; ++p) {
              const int mr = int(std::min<int64_t>(MR, mc - p * MR));
              const float* ap = abuf.p + p * kc * MR;
              if (single) {
                const int64_t npf =
                    std::max<int64_t>(0, std::min<int64_t>(per_call, int64_t(lines.size()) - pfi));
                micro<kSquareAdd>(kc, ap, bp, F + p * MR * I + q * NR, I, mr, nr,
                                  lines.data() + pfi, npf);
                pfi += npf;
              } else if (k0 == 0) {
                micro<kStore>(kc, ap, bp, gbuf.p + p * MR * NC + q * NR, NC, mr, nr);
              } else {
                micro<kAdd>(kc, ap, bp, gbuf.p + p * MR * NC + q * NR, NC, mr, nr);
              }
            }
          }
        }
        if (!single) {
          for (int64_t r = 0; r < mc; ++r)
            for (int64_t c = 0; c < nc; ++c) {
              const float v = gbuf.p[r * NC + c];
              F[r * I + c] += v * v;
            }
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// subspace_grads: out[b] = sum_t mask[b,t] (q_out^T g_bt)(q_in^T x_bt)^T. Project first, then the
// small per-sample product: per sample, over its K active tokens only (masked ones are skipped),
//   px[c, :] = x_bt_c q_in,  pg[c, :] = g_bt_c q_out      (2*K*(I*m_i + O*m_o) flops, compute-bound)
//   out[b]   = sum_c w_c pg[c, :]^T px[c, :]               (gemm_atb, 2*K*m_o*m_i flops)
// q_in / q_out are packed once as fp32 panels of NR columns (zero-padded, shared by all threads).
// The projections run micro_rows on blocks of RM token rows read in place (fp32, unit stride) or
// converted into a small fp32 scratch (bf16/fp16, strided), over SG_KC-long slices of the
// reduction dim: the tile accumulates in registers over a whole slice, whose q panel (SG_KC x NR
// fp32, 128 KB on AVX-512) stays in L2; smaller slices (128-512) measured 10-20% slower.
// Samples are spread over threads; with fewer samples than threads, each sample's row blocks are.
// Memory: T * (m_i + m_o) fp32 per thread. Single thread, AVX-512, B16 T128 I=O=1024 m32 fp32 (20%
// masked): ~0.6-0.7x the time of the torch reference (~1.8-2.3 ms vs ~2.9-3.3 ms).
// ---------------------------------------------------------------------------------------------
constexpr int64_t SG_KC = 1024;

namespace {
// Packed fp32 panels [panel][k][NR] of q [K, m]; ld = their padded width.
struct QPanels {
  int64_t K, np, ld;
  Buf p;
  explicit QPanels(const Tensor& q)
      : K(q.size[0]), np((q.size[1] + NR - 1) / NR), ld(np * NR), p(K * ld) {
    std::vector<int64_t> off(static_cast<size_t>(K));
    for (int64_t k = 0; k < K; ++k) off[k] = k * q.stride[0];
    pack<NR>(p.p, q.ptr, q.dt, off.data(), nullptr, K, q.stride[1], 0, q.size[1]);
  }
};

// Y[c, :] = v[off[c], :] q for c < n (rows of v at element offsets off; Y row stride q.ld).
// conv: RM * SG_KC floats of scratch for the rows that are not fp32 with unit stride.
void project(float* Y, const Tensor& v, const int64_t* off, int64_t n, const QPanels& q,
             float* conv) {
  const int64_t K = q.K, s = v.stride[2];
  const bool direct = v.dt == kFloat32 && s == 1;
  for (int64_t k0 = 0; k0 < K; k0 += SG_KC) {
    const int64_t kc = std::min(SG_KC, K - k0);
    for (int64_t r0 = 0; r0 < n; r0 += RM) {
      const int mr = int(std::min<int64_t>(RM, n - r0));
      const float* rows[RM];
      for (int r = 0; r < mr; ++r) {
        const int64_t o = off[r0 + r] + k0 * s;
        if (direct) {
          rows[r] = static_cast<const float*>(v.ptr) + o;
        } else {
          load_strided(conv + r * SG_KC, elem(v.ptr, v.dt, o), v.dt, s, kc, 1.0f);
          rows[r] = conv + r * SG_KC;
        }
      }
      for (int64_t p = 0; p < q.np; ++p) {
        const float* bp = q.p.p + (p * K + k0) * NR;
        float* c = Y + r0 * q.ld + p * NR;
        if (k0 == 0) {
          micro_rows<false>(kc, rows, bp, c, q.ld, mr);
        } else {
          micro_rows<true>(kc, rows, bp, c, q.ld, mr);
        }
      }
    }
  }
}
}  // namespace

void subspace_grads(float* out, const Tensor& x, const Tensor& g, const Tensor& q_in,
                    const Tensor& q_out, const float* mask, int nthreads) {
  const int64_t B = x.size[0], T = x.size[1];
  const int64_t mi = q_in.size[1], mo = q_out.size[1];
  if (B == 0 || mi == 0 || mo == 0) return;
  std::fill(out, out + B * mo * mi, 0.0f);
  if (T == 0) return;
  TokenLists tl(x, g, mask);
  const QPanels qi(q_in), qo(q_out);
  // row c of pg / px, for the product's k list
  std::vector<int64_t> ao(static_cast<size_t>(T)), bo(static_cast<size_t>(T));
  for (int64_t c = 0; c < T; ++c) ao[c] = c * qo.ld, bo[c] = c * qi.ld;
  auto product = [&](int64_t b, const float* px, const float* pg, int inner) {
    gemm_atb(mo, mi, KRows{tl.count[b], ao.data(), bo.data(), tl.w.data() + b * T},
             Operand{pg, kFloat32, 1}, Operand{px, kFloat32, 1}, out + b * mo * mi, mi, false,
             false, inner);
  };
  const int nt = std::max(1, nthreads);
  if (B >= nt) {  // one sample per thread at a time
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
      Buf px(T * qi.ld), pg(T * qo.ld), conv(RM * SG_KC);
#pragma omp for schedule(dynamic, 1)
      for (int64_t b = 0; b < B; ++b) {
        const int64_t K = tl.count[b];
        if (K == 0) continue;
        project(px.p, x, tl.xo.data() + b * T, K, qi, conv.p);
        project(pg.p, g, tl.go.data() + b * T, K, qo, conv.p);
        product(b, px.p, pg.p, 1);
      }
    }
    return;
  }
  // fewer samples than threads: the row blocks of each sample across the threads
  Buf px(T * qi.ld), pg(T * qo.ld);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t K = tl.count[b];
    if (K == 0) continue;
    const int64_t nblk = (K + RM - 1) / RM;
#pragma omp parallel num_threads(int(std::min<int64_t>(nt, nblk))) if (nblk > 1)
    {
      Buf conv(RM * SG_KC);
#pragma omp for schedule(static)
      for (int64_t blk = 0; blk < nblk; ++blk) {
        const int64_t c0 = blk * RM, n = std::min<int64_t>(RM, K - c0);
        project(px.p + c0 * qi.ld, x, tl.xo.data() + b * T + c0, n, qi, conv.p);
        project(pg.p + c0 * qo.ld, g, tl.go.data() + b * T + c0, n, qo, conv.p);
      }
    }
    product(b, px.p, pg.p, nt);
  }
}

// ---------------------------------------------------------------------------------------------
// kfac_factor: out = sum_n mask_n y_n y_n^T (y = x, or q^T x). SYRK-like, compute-bound
// (N*d^2 flops for the upper triangle, mirrored). With q, rows are projected in chunks of
// KF_ROWS (memory KF_ROWS * m fp32), then accumulated.
// kfac_sketch: out = sum_n mask_n x_n (x_n^T omega): per chunk Y = X omega, out += X^T diag(m) Y.
// ---------------------------------------------------------------------------------------------
constexpr int64_t KF_ROWS = 4096;

namespace {
struct RowList {
  std::vector<int64_t> off, idx;
  std::vector<float> w;
};
// The active rows in [n0, n1): offsets n * stride and their local indices n - n0.
RowList active_rows(const float* mask, int64_t n0, int64_t n1, int64_t stride) {
  RowList r;
  for (int64_t n = n0; n < n1; ++n) {
    const float m = mask ? mask[n] : 1.0f;
    if (m == 0.0f) continue;
    r.off.push_back(n * stride);
    r.idx.push_back(n - n0);
    r.w.push_back(m);
  }
  return r;
}
}  // namespace

void kfac_factor(float* out, const Tensor& x, const float* mask, const Tensor* q, int nthreads) {
  const int64_t N = x.size[0], I = x.size[1];
  const int nt = std::max(1, nthreads);
  if (!q) {
    RowList r = active_rows(mask, 0, N, x.stride[0]);
    gemm_atb(I, I, KRows{int64_t(r.off.size()), r.off.data(), r.off.data(), r.w.data()},
             Operand{x.ptr, x.dt, x.stride[1]}, Operand{x.ptr, x.dt, x.stride[1]}, out, I, false,
             true, nt);
    mirror_upper(out, I, I);
    return;
  }
  const int64_t m = q->size[1];
  std::fill(out, out + m * m, 0.0f);
  if (m == 0 || N == 0) return;
  std::vector<int64_t> xi(static_cast<size_t>(I)), qi(static_cast<size_t>(I));
  for (int64_t i = 0; i < I; ++i) xi[i] = i * x.stride[1], qi[i] = i * q->stride[0];
  const int64_t rows = std::min(N, KF_ROWS);
  Buf p(rows * m);
  for (int64_t n0 = 0; n0 < N; n0 += rows) {
    const int64_t n1 = std::min(N, n0 + rows);
    RowList r = active_rows(mask, n0, n1, m);
    if (r.off.empty()) continue;
    for (auto& o : r.off) o -= n0 * m;  // offsets into p
    gemm_atb(n1 - n0, m, KRows{I, xi.data(), qi.data(), nullptr},
             Operand{elem(x.ptr, x.dt, n0 * x.stride[0]), x.dt, x.stride[0]},
             Operand{q->ptr, q->dt, q->stride[1]}, p.p, m, false, false, nt);
    gemm_atb(m, m, KRows{int64_t(r.off.size()), r.off.data(), r.off.data(), r.w.data()},
             Operand{p.p, kFloat32, 1}, Operand{p.p, kFloat32, 1}, out, m, true, true, nt);
  }
  mirror_upper(out, m, m);
}

void kfac_sketch(float* out, const Tensor& x, const Tensor& omega, const float* mask,
                 int nthreads) {
  const int64_t N = x.size[0], I = x.size[1], l = omega.size[1];
  const int nt = std::max(1, nthreads);
  std::fill(out, out + I * l, 0.0f);
  if (N == 0 || I == 0 || l == 0) return;
  std::vector<int64_t> xi(static_cast<size_t>(I)), oi(static_cast<size_t>(I));
  for (int64_t i = 0; i < I; ++i) xi[i] = i * x.stride[1], oi[i] = i * omega.stride[0];
  const int64_t rows = std::min(N, KF_ROWS);
  Buf y(rows * l);
  for (int64_t n0 = 0; n0 < N; n0 += rows) {
    const int64_t n1 = std::min(N, n0 + rows);
    RowList r = active_rows(mask, n0, n1, x.stride[0]);
    if (r.off.empty()) continue;
    std::vector<int64_t> yo(r.idx.size());
    for (size_t c = 0; c < r.idx.size(); ++c) yo[c] = r.idx[c] * l;
    gemm_atb(n1 - n0, l, KRows{I, xi.data(), oi.data(), nullptr},
             Operand{elem(x.ptr, x.dt, n0 * x.stride[0]), x.dt, x.stride[0]},
             Operand{omega.ptr, omega.dt, omega.stride[1]}, y.p, l, false, false, nt);
    gemm_atb(I, l, KRows{int64_t(r.off.size()), r.off.data(), yo.data(), r.w.data()},
             Operand{x.ptr, x.dt, x.stride[1]}, Operand{y.p, kFloat32, 1}, out, l, true, false,
             nt);
  }
}

// ---------------------------------------------------------------------------------------------
// lora_merge: w[O, I] <- round(w + scale * (b @ a)). Memory-bound: one read and one write of w
// (2*O*I*k flops ride along in registers). Per block of LM_RB rows and LM_CW columns: load w into
// an L1 fp32 tile, add scale * (b_rows @ a_cols) computed in fp32 registers (a pre-converted once to
// fp32 [k, I]), round once (numeric.h rounding, vectorised) and store. No [O, I] temporary.
// ---------------------------------------------------------------------------------------------
constexpr int LM_RB = 4;  // rows per tile of the strided (tile) path
constexpr int64_t LM_CW = 512;
constexpr int LM_CV = 4;  // vectors per register tile row
constexpr int LM_RD = (VW >= 16) ? 6 : 2;  // rows per register tile of the direct path
constexpr int64_t LM_PW = LM_CV * VW;      // columns per packed panel of a
constexpr int64_t AMX_ROWS = 16, AMX_COLS = 64;  // the output block of the AMX path

namespace {
// Rows [r0, r0 + RB) of a w with unit column stride, fused: for each RB x (LM_CV * VW) register
// tile, acc = b_rows @ a_cols over k in fp32, then w = round(w + scale * acc) straight from and
// to memory (one read, one write per element).
// `ap` is a packed as panels of LM_PW columns (k x LM_PW contiguous each), `af` plain [k, I].
template <int RB, int DT, bool HW>
void lora_rows_direct(void* wp, int64_t ws0, int64_t r0, int64_t I, int64_t k, const float* brow,
                      const float* apk, const float* af, float scale) {
  const vf sv = vbcast(scale);
  int64_t c = 0;
  for (; c + LM_PW <= I; c += LM_PW) {
    vf acc[RB][LM_CV];
#pragma GCC unroll 8
    for (int i = 0; i < RB; ++i)
#pragma GCC unroll 4
      for (int j = 0; j < LM_CV; ++j) acc[i][j] = vf{};
    const float* ap = apk + c * k;  // panel c / LM_PW
    for (int64_t kk = 0; kk < k; ++kk) {
      vf av[LM_CV];
#pragma GCC unroll 4
      for (int j = 0; j < LM_CV; ++j) av[j] = *reinterpret_cast<const vf*>(ap + kk * LM_PW + j * VW);
#pragma GCC unroll 8
      for (int i = 0; i < RB; ++i) {
        const vf bi = vbcast(brow[i * k + kk]);
#pragma GCC unroll 4
        for (int j = 0; j < LM_CV; ++j) acc[i][j] += bi * av[j];
      }
    }
#pragma GCC unroll 8
    for (int i = 0; i < RB; ++i)
#pragma GCC unroll 4
      for (int j = 0; j < LM_CV; ++j) {
        const int64_t off = (r0 + i) * ws0 + c + j * VW;
        storev<DT, HW>(wp, off, loadv<DT>(wp, off) + sv * acc[i][j]);
      }
  }
  for (int i = 0; i < RB; ++i)
    for (int64_t cc = c; cc < I; ++cc) {
      float acc = 0.0f;
      for (int64_t kk = 0; kk < k; ++kk) acc += brow[i * k + kk] * af[kk * I + cc];
      const int64_t off = (r0 + i) * ws0 + cc;
      store_f32(wp, off, DT, load_f32(wp, off, DT) + scale * acc);
    }
}

template <int DT, bool HW = false>
void lora_direct(const Tensor& w, int64_t k, const float* bf, const float* apk, const float* af,
                 float scale) {
  const int64_t O = w.size[0], I = w.size[1], nrb = O / LM_RD;
  void* wp = const_cast<void*>(w.ptr);
#pragma omp for schedule(static) nowait
  for (int64_t rb = 0; rb <= nrb; ++rb) {
    if (rb < nrb) {
      lora_rows_direct<LM_RD, DT, HW>(wp, w.stride[0], rb * LM_RD, I, k, bf + rb * LM_RD * k, apk, af,
                                  scale);
    } else {
      for (int64_t r = nrb * LM_RD; r < O; ++r)
        lora_rows_direct<1, DT, HW>(wp, w.stride[0], r, I, k, bf + r * k, apk, af, scale);
    }
  }
}

#if defined(SSTM_ISA_avx512)
// The AMX path, for bf16 w, a and b (amx_enabled()). TDPBF16PS multiplies a 16 x kc bf16 tile (16
// rows of b) by a kc/2 x 16 tile of bf16 pairs (a, rows 2q and 2q+1 interleaved) into a 16 x 16
// fp32 tile: products of bf16 are exact in fp32 and the sums are fp32 (denormals flush to zero),
// the FMA path's arithmetic in another order. Per 16 x 64 block the rank terms take 4 tile
// products (~150 cycles with the tile loads and stores) instead of ~1000 cycles of FMAs, so w's
// one read and one write nearly set the pace. Measured on a 2-core Xeon at 4096 x 4096, r=16: tile
// work 0.43 ms, the w stream ~1.0 ms, and they add up: they do not overlap, and neither
// prefetching, double-buffered blocks nor wider blocks (16 x 256 .. 16 x 4096) made them.
//   bp  b as [O][kpad] bf16 (zero columns past k);
//   ap  a as pairs, [I / 16][kpad / 2][16] uint32 (low half row 2q, high half row 2q + 1);
//   kc  rank terms per tile product (even, <= 32); kpad a multiple of kc.

void pack_amx(const Tensor& a, const Tensor& b, int64_t kpad, uint16_t* bp, uint32_t* ap) {
  const int64_t k = b.size[1], O = b.size[0], I = a.size[1], k2 = kpad / 2;
  const uint16_t* pa = static_cast<const uint16_t*>(a.ptr);
  const uint16_t* pb = static_cast<const uint16_t*>(b.ptr);
  for (int64_t o = 0; o < O; ++o) {
    const uint16_t* src = pb + o * b.stride[0];
    uint16_t* dst = bp + o * kpad;
    for (int64_t kk = 0; kk < k; ++kk) dst[kk] = src[kk * b.stride[1]];
    for (int64_t kk = k; kk < kpad; ++kk) dst[kk] = 0;
  }
  // rows 2q and 2q + 1 of a, column by column (contiguous runs when a's rows are: vectorised)
  std::vector<uint16_t> lo(size_t(I / 16 * 16)), hi(size_t(I / 16 * 16));
  for (int64_t q = 0; q < k2; ++q) {
    for (int64_t c = 0; c < I / 16 * 16; ++c) {
      lo[c] = 2 * q < k ? pa[2 * q * a.stride[0] + c * a.stride[1]] : 0;
      hi[c] = 2 * q + 1 < k ? pa[(2 * q + 1) * a.stride[0] + c * a.stride[1]] : 0;
    }
    for (int64_t p = 0; p < I / 16; ++p)
      for (int64_t j = 0; j < 16; ++j)
        ap[(p * k2 + q) * 16 + j] = uint32_t(lo[p * 16 + j]) | (uint32_t(hi[p * 16 + j]) << 16);
  }
}

__attribute__((target("amx-tile,amx-bf16"))) void lora_amx(const Tensor& w, int64_t k, int64_t kc,
                                                          int64_t kpad, const uint16_t* bp,
                                                          const uint32_t* ap, const float* bf,
                                                          const float* apk, const float* af,
                                                          float scale) {
  const int64_t O = w.size[0], I = w.size[1], ws0 = w.stride[0];
  const int64_t nrb = O / AMX_ROWS, Ic = I / AMX_COLS * AMX_COLS, pstride = kpad / 2 * 16;
  uint16_t* wp = static_cast<uint16_t*>(const_cast<void*>(w.ptr));
  TileConfig cfg;
  for (int t = 0; t < 4; ++t) cfg.rows[t] = AMX_ROWS, cfg.colsb[t] = 64;  // C: 16 x 16 fp32
  cfg.rows[4] = AMX_ROWS, cfg.colsb[4] = uint16_t(kc * 2);                // b: 16 x kc bf16
  for (int t = 5; t < 7; ++t) cfg.rows[t] = uint8_t(kc / 2), cfg.colsb[t] = 64;  // a: pairs
  _tile_loadconfig(&cfg);
  alignas(64) float cbuf[AMX_ROWS][AMX_COLS];
  const vf sv = vbcast(scale);
#pragma omp for schedule(static) nowait
  for (int64_t rb = 0; rb <= nrb; ++rb) {
    if (rb == nrb) {  // the last O % 16 rows: the FMA path
      for (int64_t r = nrb * AMX_ROWS; r < O; ++r)
        lora_rows_direct<1, kBFloat16, true>(wp, ws0, r, I, k, bf + r * k, apk, af, scale);
      continue;
    }
    const int64_t r0 = rb * AMX_ROWS;
    for (int64_t c = 0; c < Ic; c += AMX_COLS) {
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int64_t k0 = 0; k0 < kpad; k0 += kc) {
        const uint32_t* a0 = ap + (c / 16) * pstride + k0 / 2 * 16;
        _tile_loadd(4, bp + r0 * kpad + k0, kpad * 2);
        _tile_loadd(5, a0, 64);
        _tile_dpbf16ps(0, 4, 5);
        _tile_loadd(6, a0 + pstride, 64);
        _tile_dpbf16ps(1, 4, 6);
        _tile_loadd(5, a0 + 2 * pstride, 64);
        _tile_dpbf16ps(2, 4, 5);
        _tile_loadd(6, a0 + 3 * pstride, 64);
        _tile_dpbf16ps(3, 4, 6);
      }
      _tile_stored(0, &cbuf[0][0], AMX_COLS * 4);
      _tile_stored(1, &cbuf[0][16], AMX_COLS * 4);
      _tile_stored(2, &cbuf[0][32], AMX_COLS * 4);
      _tile_stored(3, &cbuf[0][48], AMX_COLS * 4);
      for (int64_t i = 0; i < AMX_ROWS; ++i)
#pragma GCC unroll 4
        for (int64_t j = 0; j < AMX_COLS; j += VW) {
          const int64_t off = (r0 + i) * ws0 + c + j;
          storev<kBFloat16, true>(wp, off, loadv<kBFloat16>(wp, off) + sv * vload(&cbuf[i][j]));
        }
    }
    for (int64_t r = r0; r < r0 + AMX_ROWS; ++r)  // the columns past the last 64
      for (int64_t cc = Ic; cc < I; ++cc) {
        float acc = 0.0f;
        for (int64_t kk = 0; kk < k; ++kk) acc += bf[r * k + kk] * af[kk * I + cc];
        const int64_t off = r * ws0 + cc;
        store_f32(wp, off, kBFloat16, load_f32(wp, off, kBFloat16) + scale * acc);
      }
  }
  _tile_release();
}
#endif
}  // namespace

void lora_merge(const Tensor& w, const Tensor& b, const Tensor& a, float scale, int nthreads) {
  const int64_t O = w.size[0], I = w.size[1], k = b.size[1];
  if (O == 0 || I == 0) return;
  const int nt = std::max(1, nthreads);
  // bf16 w and factors where AMX runs: the tile path (lora_amx), with the factors packed for it.
  bool amx = false;
  int64_t kc = 0, kpad = 0;
#if defined(SSTM_ISA_avx512)
  amx = k > 0 && w.stride[1] == 1 && w.dt == kBFloat16 && a.dt == kBFloat16 &&
        b.dt == kBFloat16 && has_avx512bf16() && amx_enabled();
  kc = std::min<int64_t>(32, std::max<int64_t>(2, (k + 1) / 2 * 2));
  kpad = (k + kc - 1) / kc * kc;
#endif
  Buf bpk(amx ? (O * kpad + 1) / 2 : 1), apr(amx ? I / 16 * 16 * kpad / 2 : 1);
#if defined(SSTM_ISA_avx512)
  if (amx)
    pack_amx(a, b, kpad, reinterpret_cast<uint16_t*>(bpk.p), reinterpret_cast<uint32_t*>(apr.p));
#endif
  // The factors as fp32 (O(k * (O + I)), microseconds), for every path but whole AMX tiles: in
  // the calling thread, so the parallel region below has no barrier but its end (each barrier
  // costs a time slice on a busy machine).
  const bool f32 = !amx || O % AMX_ROWS != 0 || I % AMX_COLS != 0;
  Buf af(f32 ? k * I : 1), bf(f32 ? O * k : 1);
  Buf apk(f32 && w.stride[1] == 1 ? k * (I / LM_PW) * LM_PW : 1);
  if (f32) {
    for (int64_t r = 0; r < k; ++r)
      load_strided(af.p + r * I, elem(a.ptr, a.dt, r * a.stride[0]), a.dt, a.stride[1], I, 1.0f);
    for (int64_t o = 0; o < O; ++o)
      load_strided(bf.p + o * k, elem(b.ptr, b.dt, o * b.stride[0]), b.dt, b.stride[1], k, 1.0f);
    if (w.stride[1] == 1)
      for (int64_t pc = 0; pc < I / LM_PW; ++pc)
        for (int64_t kk = 0; kk < k; ++kk)
          memcpy(apk.p + (pc * k + kk) * LM_PW, af.p + kk * I + pc * LM_PW, LM_PW * 4);
  }
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    if (amx) {
#if defined(SSTM_ISA_avx512)
      lora_amx(w, k, kc, kpad, reinterpret_cast<const uint16_t*>(bpk.p),
               reinterpret_cast<const uint32_t*>(apr.p), bf.p, apk.p, af.p, scale);
#endif
    } else if (w.stride[1] == 1) {  // rows contiguous: the fused direct path
      if (w.dt == kFloat32) {
        lora_direct<kFloat32>(w, k, bf.p, apk.p, af.p, scale);
      } else if (w.dt == kBFloat16) {
#if defined(SSTM_ISA_avx512)
        if (has_avx512bf16())
          lora_direct<kBFloat16, true>(w, k, bf.p, apk.p, af.p, scale);
        else
#endif
          lora_direct<kBFloat16>(w, k, bf.p, apk.p, af.p, scale);
      } else {
        lora_direct<kFloat16>(w, k, bf.p, apk.p, af.p, scale);
      }
    } else {
    // any strides: through an L1 fp32 tile of LM_RB x LM_CW
    alignas(64) float tile[LM_RB][LM_CW];
    void* wp = const_cast<void*>(w.ptr);
    const int64_t nrb = (O + LM_RB - 1) / LM_RB;
#pragma omp for schedule(static) nowait
    for (int64_t rb = 0; rb < nrb; ++rb) {
      const int64_t r0 = rb * LM_RB, rr = std::min<int64_t>(LM_RB, O - r0);
      const float* brow = bf.p + r0 * k;
      for (int64_t c0 = 0; c0 < I; c0 += LM_CW) {
        const int64_t cw = std::min(LM_CW, I - c0);
        for (int64_t r = 0; r < rr; ++r)
          load_strided(tile[r], elem(w.ptr, w.dt, (r0 + r) * w.stride[0] + c0 * w.stride[1]),
                       w.dt, w.stride[1], cw, 1.0f);
        int64_t c = 0;
        if (rr == LM_RB) {
          for (; c + LM_CV * VW <= cw; c += LM_CV * VW) {
            vf acc[LM_RB][LM_CV];
#pragma GCC unroll 4
            for (int i = 0; i < LM_RB; ++i)
#pragma GCC unroll 4
              for (int j = 0; j < LM_CV; ++j) acc[i][j] = vf{};
            const float* ap = af.p + c0 + c;
            for (int64_t kk = 0; kk < k; ++kk) {
              vf av[LM_CV];
#pragma GCC unroll 4
              for (int j = 0; j < LM_CV; ++j) av[j] = vload(ap + kk * I + j * VW);
#pragma GCC unroll 4
              for (int i = 0; i < LM_RB; ++i) {
                const vf bi = vbcast(brow[i * k + kk]);
#pragma GCC unroll 4
                for (int j = 0; j < LM_CV; ++j) acc[i][j] += bi * av[j];
              }
            }
            const vf sv = vbcast(scale);
#pragma GCC unroll 4
            for (int i = 0; i < LM_RB; ++i)
#pragma GCC unroll 4
              for (int j = 0; j < LM_CV; ++j) {
                float* t = &tile[i][c + j * VW];
                vstore(t, vload(t) + sv * acc[i][j]);
              }
          }
        }
        for (int64_t r = 0; r < rr; ++r)
          for (int64_t cc = c; cc < cw; ++cc) {
            float acc = 0.0f;
            for (int64_t kk = 0; kk < k; ++kk) acc += brow[r * k + kk] * af.p[kk * I + c0 + cc];
            tile[r][cc] += scale * acc;
          }
        for (int64_t r = 0; r < rr; ++r)
          store_strided(elem(wp, w.dt, (r0 + r) * w.stride[0] + c0 * w.stride[1]), w.dt,
                        w.stride[1], tile[r], cw);
      }
    }
    }
  }
}

}  // namespace SSTM_ISA
}  // namespace sstm
