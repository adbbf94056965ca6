// Per-tile math of the CUDA kernels, as host + device inline functions.
//
// Every CUDA kernel of sstmerge (csrc/cuda/kernels.cu) is one tile product
//
//     C[i, j] += sum_r w_r * A[r, i] * B[r, j]          (fp32 accumulation)
//
// over strided fp32 / bf16 / fp16 matrices, followed by an op-specific epilogue:
//   diag_fisher_linear   A = g_b (rows t, cols o), B = x_b (rows t, cols i), w = mask[b];
//                        epilogue F += C * C, once per sample
//   subspace_grads       A = (g q_out)_b, B = (x q_in)_b, w = mask[b]      (projections first)
//   kfac_factor          A = B = x (or x q), w = mask
//   kfac_sketch          A = x, B = x omega, w = mask
//   project (x @ q)      A = x^T (rows k, cols n), B = q (rows k, cols l)
//   lora_merge_          A = b^T (rows k, cols o), B = a (rows k, cols i); epilogue
//                        w <- round(w + scale * C)
//
// A block of kThreads threads owns a [kTile x kTile] tile of C. It walks the reduction in chunks
// of kRows rows: each thread stages its share of the A and B chunks into shared memory
// (stage_chunk), the block synchronises, each thread adds its kMicro x kMicro sub-tile
// (micro_step), the block synchronises again. Written as functions of the thread index, so the
// CPU build (and tests/ops/test_cuda_math.py) can run the same code thread by thread.
#pragma once
#include <cstdint>

#include "common/numeric.h"

namespace sstm {
namespace tile {

constexpr int kTile = 64;                   // C tile is kTile x kTile
constexpr int kRows = 16;                   // reduction rows staged per chunk
constexpr int kThreads = 256;               // threads per block (16 x 16)
constexpr int kMicro = 4;                   // each thread owns kMicro x kMicro entries of C
constexpr int kSide = kTile / kMicro;       // 16 threads along each side of the tile
constexpr int kPitch = kTile + 1;           // shared-memory row pitch (avoids bank conflicts)
constexpr int kStageSize = kRows * kPitch;  // floats of one staged chunk
constexpr int kPerThread = kRows * kTile / kThreads;  // elements each thread stages per chunk
static_assert(kSide * kSide == kThreads, "one thread per micro-tile");
static_assert(kRows * kTile % kThreads == 0, "chunk divides evenly among threads");

// A strided matrix view: element (r, c) is element `r * sr + c * sc` of `p` (dtype code `dt`).
// `rows` / `cols` bound the valid region; everything outside reads as 0.
struct View {
  const void* p;
  int64_t sr, sc;
  int64_t rows, cols;
  int dt;
};

// Optional per-row weights (the mask): w[r * ws], or 1 when w is null.
struct RowWeights {
  const float* w;
  int64_t ws;
};

SSTM_HD View offset_view(View v, int64_t elems) {
  // The same matrix shifted by `elems` elements (e.g. to sample b of a batch).
  v.p = static_cast<const char*>(v.p) + elems * (v.dt == kFloat32 ? 4 : 2);
  return v;
}

SSTM_HD float row_weight(RowWeights w, int64_t r) { return w.w ? w.w[r * w.ws] : 1.0f; }

// Element e (0 <= e < kRows * kTile) of a chunk -> (row, col) inside the chunk. When the view's
// columns are contiguous, consecutive threads take consecutive columns (coalesced); when its rows
// are (a transposed operand), consecutive threads take consecutive rows.
SSTM_HD void chunk_coords(int e, bool col_fast, int* r, int* c) {
  if (col_fast) {
    *r = e / kTile;
    *c = e % kTile;
  } else {
    *r = e % kRows;
    *c = e / kRows;
  }
}

// Thread `tid` stages its kPerThread elements of rows [r0, r0 + kRows) and columns
// [c0, c0 + kTile) of `v` into `s` (row-major, pitch kPitch) as fp32 times the row weight;
// rows at or beyond r_end and columns beyond v.cols are staged as 0.
SSTM_HD void stage_chunk(float* s, const View& v, RowWeights w, int64_t r0, int64_t r_end,
                         int64_t c0, int tid) {
  const bool col_fast = v.sc == 1 || v.sr != 1;
  for (int k = 0; k < kPerThread; ++k) {
    int r, c;
    chunk_coords(tid + k * kThreads, col_fast, &r, &c);
    const int64_t gr = r0 + r, gc = c0 + c;
    float val = 0.0f;
    if (gr < r_end && gr < v.rows && gc < v.cols) {
      val = load_f32(v.p, gr * v.sr + gc * v.sc, v.dt) * row_weight(w, gr);
    }
    s[r * kPitch + c] = val;
  }
}

// Thread `tid`'s entries of the tile: rows ty + kSide * ii, columns tx + kSide * jj.
SSTM_HD int micro_row(int tid, int ii) { return tid / kSide + kSide * ii; }
SSTM_HD int micro_col(int tid, int jj) { return tid % kSide + kSide * jj; }

// acc[ii][jj] += sum_r As[r][micro_row] * Bs[r][micro_col] over the kRows staged rows (rows past
// the end of the reduction were staged as 0, so a constant trip count is exact and unrolls).
SSTM_HD void micro_step(float (&acc)[kMicro][kMicro], const float* As, const float* Bs, int tid) {
  for (int r = 0; r < kRows; ++r) {
    float a[kMicro], b[kMicro];
    for (int ii = 0; ii < kMicro; ++ii) a[ii] = As[r * kPitch + micro_row(tid, ii)];
    for (int jj = 0; jj < kMicro; ++jj) b[jj] = Bs[r * kPitch + micro_col(tid, jj)];
    for (int ii = 0; ii < kMicro; ++ii)
      for (int jj = 0; jj < kMicro; ++jj) acc[ii][jj] += a[ii] * b[jj];
  }
}

SSTM_HD void zero(float (&acc)[kMicro][kMicro]) {
  for (int ii = 0; ii < kMicro; ++ii)
    for (int jj = 0; jj < kMicro; ++jj) acc[ii][jj] = 0.0f;
}

// Epilogue of diag_fisher_linear, once per sample: F += G * G.
SSTM_HD void add_square(float (&fisher)[kMicro][kMicro], const float (&grad)[kMicro][kMicro]) {
  for (int ii = 0; ii < kMicro; ++ii)
    for (int jj = 0; jj < kMicro; ++jj) fisher[ii][jj] += grad[ii][jj] * grad[ii][jj];
}

// End of the row range of a split starting at r_begin: min(r_begin + rows_per_split, rows).
SSTM_HD int64_t split_end(int64_t r_begin, int64_t rows_per_split, int64_t rows) {
  return r_begin + rows_per_split < rows ? r_begin + rows_per_split : rows;
}

// Epilogue of lora_merge_: the fp32 value of the merged weight before its single rounding.
SSTM_HD float lora_merged(float w, float prod, float scale) { return w + scale * prod; }

// lora_merge_'s store: thread `tid`'s entries of the [O, I] weight (dtype w_dt, strides so, si)
// at tile (o0, i0) become round(w + scale * prod), read and written by this thread only.
SSTM_HD void merge_tile(void* w, int w_dt, int64_t so, int64_t si, int64_t O, int64_t I,
                        int64_t o0, int64_t i0, const float (&prod)[kMicro][kMicro], float scale,
                        int tid) {
  for (int ii = 0; ii < kMicro; ++ii) {
    const int64_t o = o0 + micro_row(tid, ii);
    for (int jj = 0; jj < kMicro; ++jj) {
      const int64_t i = i0 + micro_col(tid, jj);
      if (o < O && i < I) {
        const int64_t e = o * so + i * si;
        store_f32(w, e, w_dt, lora_merged(load_f32(w, e, w_dt), prod[ii][jj], scale));
      }
    }
  }
}

// Store thread `tid`'s entries of the fp32 tile at (i0, j0) of an [m, n] fp32 matrix with strides
// (si, sj); with `mirror`, also store them transposed at (j0, i0) (symmetric outputs).
SSTM_HD void store_tile(float* out, int64_t si, int64_t sj, int64_t m, int64_t n, int64_t i0,
                        int64_t j0, const float (&acc)[kMicro][kMicro], int tid, bool mirror) {
  for (int ii = 0; ii < kMicro; ++ii) {
    const int64_t i = i0 + micro_row(tid, ii);
    for (int jj = 0; jj < kMicro; ++jj) {
      const int64_t j = j0 + micro_col(tid, jj);
      if (i < m && j < n) {
        out[i * si + j * sj] = acc[ii][jj];
        if (mirror) out[j * si + i * sj] = acc[ii][jj];
      }
    }
  }
}

}  // namespace tile
}  // namespace sstm
