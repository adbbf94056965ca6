// The arguments of the tiled kernels (csrc/cuda/kernels.cu), built from what Python passes: raw
// pointers (integers), dtype codes, sizes and strides.
//
// Host-only plain C++ shared by the pybind11 bindings of the CUDA module and by the CPU emulation
// of the kernels in tests/ops/test_cuda_math.py, so that the mapping from tensors to tile views is
// tested on the CPU together with the tile math of common/tile_math.h.
#pragma once
#include <cstdint>

#include "common/tile_math.h"

namespace sstm {

// diag_fisher_linear: F[O, I] = sum_b G_b * G_b, G_b = g_b^T diag(mask_b) x_b.
// g viewed as rows T x cols O, x as rows T x cols I; sample b is shifted by b * *_sb elements.
struct FisherArgs {
  tile::View g, x;
  tile::RowWeights mask;
  int64_t batch, g_sb, x_sb, mask_sb;
  float* out;  // [O, I] fp32, contiguous
};

// out[n * splits + s] = A_n[rows of s]^T diag(w_n) B_n[rows of s], each [a.cols, b.cols] fp32,
// contiguous; the rows of split s are [s * rows_per_split, (s + 1) * rows_per_split) clipped to
// a.rows. symmetric (A is B): only tiles on or above the diagonal are computed, then mirrored.
struct GramArgs {
  tile::View a, b;
  tile::RowWeights w;
  int64_t a_sb, b_sb, w_sb;
  int64_t batch, rows_per_split, splits;
  bool symmetric;
  float* out;
};

// lora_merge_: w[O, I] <- round(w + scale * bt^T a); bt = b^T (rows K, cols O), a (rows K, cols I).
struct MergeArgs {
  tile::View bt, a;
  void* w;
  int w_dt;
  int64_t w_so, w_si;
  float scale;
};

inline bool valid_dtype(int dt) { return dt == kFloat32 || dt == kBFloat16 || dt == kFloat16; }

inline tile::View make_view(uintptr_t ptr, int dt, int64_t sr, int64_t sc, int64_t rows,
                            int64_t cols) {
  return tile::View{reinterpret_cast<const void*>(ptr), sr, sc, rows, cols, dt};
}

// x [B, T, I] and g [B, T, O] of dtype dt with strides xs / gs; mask fp32 [B, T] (0 = none).
inline FisherArgs fisher_args(uintptr_t x, const int64_t* xs, uintptr_t g, const int64_t* gs,
                              int dt, uintptr_t mask, const int64_t* ms, int64_t B, int64_t T,
                              int64_t I, int64_t O, uintptr_t out) {
  return FisherArgs{make_view(g, dt, gs[1], gs[2], T, O),
                    make_view(x, dt, xs[1], xs[2], T, I),
                    tile::RowWeights{reinterpret_cast<const float*>(mask), ms[1]},
                    B, gs[0], xs[0], ms[0], reinterpret_cast<float*>(out)};
}

// a [batch, rows, M] and b [batch, rows, L] with (batch, row, col) strides; w fp32 [batch, rows]
// (0 = none) with (batch, row) strides.
inline GramArgs gram_args(uintptr_t a, int a_dt, const int64_t* as, uintptr_t b, int b_dt,
                          const int64_t* bs, uintptr_t w, const int64_t* ws, int64_t batch,
                          int64_t rows, int64_t M, int64_t L, int64_t rows_per_split,
                          int64_t splits, bool symmetric, uintptr_t out) {
  return GramArgs{make_view(a, a_dt, as[1], as[2], rows, M),
                  make_view(b, b_dt, bs[1], bs[2], rows, L),
                  tile::RowWeights{reinterpret_cast<const float*>(w), ws[1]},
                  as[0], bs[0], ws[0], batch, rows_per_split, splits, symmetric,
                  reinterpret_cast<float*>(out)};
}

// w [O, I] (dtype w_dt, strides wst), b [O, K] and a [K, I] (dtype ab_dt, strides bs / as).
inline MergeArgs merge_args(uintptr_t w, int w_dt, const int64_t* wst, uintptr_t b,
                            const int64_t* bs, uintptr_t a, const int64_t* as, int ab_dt,
                            int64_t O, int64_t I, int64_t K, double scale) {
  return MergeArgs{make_view(b, ab_dt, bs[1], bs[0], K, O), make_view(a, ab_dt, as[0], as[1], K, I),
                   reinterpret_cast<void*>(w), w_dt, wst[0], wst[1], static_cast<float>(scale)};
}

// Problems the launch refuses (nullptr when fine). Grid: x < 2^31, y and z <= 65535.
inline int64_t n_tiles(int64_t n) { return (n + tile::kTile - 1) / tile::kTile; }
inline const char* check_grid(int64_t gx, int64_t gy, int64_t gz) {
  if (gx > 2147483647LL || gy > 65535 || gz > 65535)
    return "problem too large for one launch (grid limit: tiles along d_in or outputs <= 65535)";
  return nullptr;
}
inline const char* check(const GramArgs& p) {
  if (p.splits < 1 || p.rows_per_split < 1) return "gram: splits and rows_per_split must be >= 1";
  if (p.symmetric && p.a.cols != p.b.cols) return "gram: a symmetric product needs a square output";
  return check_grid(n_tiles(p.a.cols), n_tiles(p.b.cols), p.batch * p.splits);
}
inline const char* check(const FisherArgs& p) {
  return check_grid(n_tiles(p.g.cols), n_tiles(p.x.cols), 1);
}
inline const char* check(const MergeArgs& p) {
  return check_grid(n_tiles(p.bt.cols), n_tiles(p.a.cols), 1);
}

}  // namespace sstm
