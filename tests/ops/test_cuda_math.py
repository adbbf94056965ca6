"""The CUDA backend's tile math and glue, run on the CPU.

No GPU runs here, so this test compiles a CPU emulation of the three CUDA kernels with the host
C++ compiler: the same SSTM_HD tile functions (csrc/common/tile_math.h) and the same argument
mapping (csrc/common/kernel_args.h) that csrc/cuda/kernels.cu and the bindings use, driven block
by block and thread by thread, with each phase between two ``__syncthreads`` run for every thread
in turn. The emulation replaces ``sstmerge._C_cuda`` under ``sstmerge.ops._cuda``, so the Python
glue (projections, row splits, strides, dtype codes) runs unchanged on CPU tensors and is
compared with float64 references. Only the launch code in kernels.cu is left untested here.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from sstmerge.ops import _cuda

CSRC = Path(__file__).resolve().parents[2] / "csrc"

EMULATOR = r"""
#include <cstdint>
#include <vector>

#include "common/kernel_args.h"

using namespace sstm;
using namespace sstm::tile;

namespace {

struct Acc { float v[kMicro][kMicro]; };
struct Shared { float As[kStageSize]; float Bs[kStageSize]; };

// kernels.cu accumulate(): stage (all threads) | __syncthreads | micro_step (all) | __syncthreads
void accumulate(std::vector<Acc>& acc, Shared& sh, const View& a, const View& b, RowWeights w,
                int64_t r_begin, int64_t r_end, int64_t i0, int64_t j0) {
  for (int64_t r0 = r_begin; r0 < r_end; r0 += kRows) {
    for (int tid = 0; tid < kThreads; ++tid) {
      stage_chunk(sh.As, a, w, r0, r_end, i0, tid);
      stage_chunk(sh.Bs, b, RowWeights{nullptr, 0}, r0, r_end, j0, tid);
    }
    for (int tid = 0; tid < kThreads; ++tid) micro_step(acc[tid].v, sh.As, sh.Bs, tid);
  }
}

}  // namespace

extern "C" const char* emu_diag_fisher(uintptr_t x, const int64_t* xs, uintptr_t g,
                                       const int64_t* gs, int dt, uintptr_t mask,
                                       const int64_t* ms, int64_t B, int64_t T, int64_t I,
                                       int64_t O, uintptr_t out) {
  const FisherArgs p = fisher_args(x, xs, g, gs, dt, mask, ms, B, T, I, O, out);
  if (p.g.cols == 0 || p.x.cols == 0) return nullptr;
  if (const char* err = check(p)) return err;
  Shared sh;
  std::vector<Acc> fisher(kThreads), grad(kThreads);
  for (int64_t bx = 0; bx < n_tiles(p.g.cols); ++bx)
    for (int64_t by = 0; by < n_tiles(p.x.cols); ++by) {
      const int64_t i0 = bx * kTile, j0 = by * kTile;
      for (int tid = 0; tid < kThreads; ++tid) zero(fisher[tid].v);
      for (int64_t b = 0; b < p.batch; ++b) {
        for (int tid = 0; tid < kThreads; ++tid) zero(grad[tid].v);
        const RowWeights mb{p.mask.w ? p.mask.w + b * p.mask_sb : nullptr, p.mask.ws};
        accumulate(grad, sh, offset_view(p.g, b * p.g_sb), offset_view(p.x, b * p.x_sb), mb, 0,
                   p.g.rows, i0, j0);
        for (int tid = 0; tid < kThreads; ++tid) add_square(fisher[tid].v, grad[tid].v);
      }
      for (int tid = 0; tid < kThreads; ++tid)
        store_tile(p.out, p.x.cols, 1, p.g.cols, p.x.cols, i0, j0, fisher[tid].v, tid, false);
    }
  return nullptr;
}

extern "C" const char* emu_gram(uintptr_t a, int a_dt, const int64_t* as, uintptr_t b, int b_dt,
                                const int64_t* bs, uintptr_t w, const int64_t* ws, int64_t batch,
                                int64_t rows, int64_t M, int64_t L, int64_t rows_per_split,
                                int64_t splits, bool symmetric, uintptr_t out) {
  const GramArgs p = gram_args(a, a_dt, as, b, b_dt, bs, w, ws, batch, rows, M, L,
                               rows_per_split, splits, symmetric, out);
  if (p.a.cols == 0 || p.b.cols == 0 || p.batch == 0) return nullptr;
  if (const char* err = check(p)) return err;
  Shared sh;
  std::vector<Acc> acc(kThreads);
  for (int64_t bz = 0; bz < p.batch * p.splits; ++bz)
    for (int64_t bx = 0; bx < n_tiles(p.a.cols); ++bx)
      for (int64_t by = 0; by < n_tiles(p.b.cols); ++by) {
        if (p.symmetric && by < bx) continue;
        const int64_t i0 = bx * kTile, j0 = by * kTile;
        const int64_t n = bz / p.splits, s = bz % p.splits;
        const int64_t r_begin = s * p.rows_per_split;
        const int64_t r_end = split_end(r_begin, p.rows_per_split, p.a.rows);
        const RowWeights wn{p.w.w ? p.w.w + n * p.w_sb : nullptr, p.w.ws};
        for (int tid = 0; tid < kThreads; ++tid) zero(acc[tid].v);
        accumulate(acc, sh, offset_view(p.a, n * p.a_sb), offset_view(p.b, n * p.b_sb), wn,
                   r_begin, r_end, i0, j0);
        for (int tid = 0; tid < kThreads; ++tid)
          store_tile(p.out + bz * M * L, L, 1, M, L, i0, j0, acc[tid].v, tid,
                     p.symmetric && by > bx);
      }
  return nullptr;
}

extern "C" const char* emu_lora_merge(uintptr_t w, int w_dt, const int64_t* wst, uintptr_t b,
                                      const int64_t* bs, uintptr_t a, const int64_t* as,
                                      int ab_dt, int64_t O, int64_t I, int64_t K, double scale) {
  const MergeArgs p = merge_args(w, w_dt, wst, b, bs, a, as, ab_dt, O, I, K, scale);
  if (p.bt.cols == 0 || p.a.cols == 0) return nullptr;
  if (const char* err = check(p)) return err;
  Shared sh;
  std::vector<Acc> acc(kThreads);
  for (int64_t bx = 0; bx < n_tiles(p.bt.cols); ++bx)
    for (int64_t by = 0; by < n_tiles(p.a.cols); ++by) {
      const int64_t i0 = bx * kTile, j0 = by * kTile;
      for (int tid = 0; tid < kThreads; ++tid) zero(acc[tid].v);
      accumulate(acc, sh, p.bt, p.a, RowWeights{nullptr, 0}, 0, p.bt.rows, i0, j0);
      for (int tid = 0; tid < kThreads; ++tid)
        merge_tile(p.w, p.w_dt, p.w_so, p.w_si, p.bt.cols, p.a.cols, i0, j0, acc[tid].v, p.scale,
                   tid);
    }
  return nullptr;
}
"""


def _i64s(seq):
    return (ctypes.c_int64 * len(seq))(*seq)


class _Emulated:
    """Stands in for sstmerge._C_cuda: same functions and arguments, run by the CPU emulation."""

    def __init__(self, lib):
        self.lib = lib
        P, I64, INT = ctypes.c_uint64, ctypes.c_int64, ctypes.c_int
        PI64 = ctypes.POINTER(ctypes.c_int64)
        lib.emu_diag_fisher.argtypes = [P, PI64, P, PI64, INT, P, PI64, I64, I64, I64, I64, P]
        lib.emu_gram.argtypes = [P, INT, PI64, P, INT, PI64, P, PI64] + [I64] * 6
        lib.emu_gram.argtypes += [ctypes.c_bool, P]
        lib.emu_lora_merge.argtypes = [P, INT, PI64, P, PI64, P, PI64, INT, I64, I64, I64]
        lib.emu_lora_merge.argtypes += [ctypes.c_double]
        for f in (lib.emu_diag_fisher, lib.emu_gram, lib.emu_lora_merge):
            f.restype = ctypes.c_char_p

    @staticmethod
    def _raise(op, err):
        if err is not None:
            raise RuntimeError(f"sstmerge._C_cuda.{op}: {err.decode()}")

    def diag_fisher_linear(self, x, xs, g, gs, dt, mask, ms, B, T, I, O, out, device, stream):
        self._raise("diag_fisher_linear", self.lib.emu_diag_fisher(
            x, _i64s(xs), g, _i64s(gs), dt, mask, _i64s(ms), B, T, I, O, out))

    def gram(self, a, a_dt, as_, b, b_dt, bs, w, ws, batch, rows, M, L, rps, splits, sym, out,
             device, stream):
        self._raise("gram", self.lib.emu_gram(
            a, a_dt, _i64s(as_), b, b_dt, _i64s(bs), w, _i64s(ws), batch, rows, M, L, rps, splits,
            sym, out))

    def lora_merge_(self, w, w_dt, wst, b, bs, a, as_, ab_dt, O, I, K, scale, device, stream):
        self._raise("lora_merge_", self.lib.emu_lora_merge(
            w, w_dt, _i64s(wst), b, _i64s(bs), a, _i64s(as_), ab_dt, O, I, K, scale))


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no host C++ compiler to build the CPU emulation of the CUDA kernels")
    if not (CSRC / "common" / "tile_math.h").exists():
        pytest.skip("csrc/ is not next to the tests (run from a source checkout)")
    d = tmp_path_factory.mktemp("cuda_emu")
    (d / "emu.cpp").write_text(EMULATOR)
    so = d / "emu.so"
    subprocess.run(
        [cxx, "-std=c++17", "-O2", "-Wall", "-Wextra", "-shared", "-fPIC",
         f"-I{CSRC}", str(d / "emu.cpp"), "-o", str(so)],
        check=True, capture_output=True, text=True,
    )
    return _Emulated(ctypes.CDLL(str(so)))


@pytest.fixture
def cuda_glue(emulated, monkeypatch):
    monkeypatch.setattr(_cuda, "_C", emulated)
    return _cuda


DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(3, 37, 123, 77), (1, 1, 5, 3), (2, 16, 64, 128)]


def _close(got, ref, rtol=2e-6):
    """fp32 accumulation of exactly representable inputs: relative to the largest entry."""
    assert got.dtype == torch.float32 and got.shape == ref.shape
    assert torch.isfinite(got).all()
    scale = ref.abs().max().item() if ref.numel() else 0.0
    err = (got.double() - ref).abs().max().item() if ref.numel() else 0.0
    assert err <= rtol * max(scale, 1e-30) * 10, f"max error {err:.3g} vs scale {scale:.3g}"


def _inputs(B, T, I, O, dtype, masked, strided):
    gen = torch.Generator().manual_seed(B * 1000 + T * 10 + I + O)
    x = torch.randn(B, T, I, generator=gen).to(dtype)
    g = torch.randn(B, T, O, generator=gen).to(dtype)
    if strided:  # same values, non-contiguous layouts
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
        g = torch.randn(B, T, 2 * O, generator=gen).to(dtype)[:, :, ::2]
    mask = None
    if masked:
        mask = torch.rand(B, T, generator=gen) > 0.4
        mask[0] = False  # an empty row
    return x, g, mask


def _m64(mask, B, T):
    return torch.ones(B, T, dtype=torch.float64) if mask is None else mask.double()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("masked,strided", [(False, False), (True, True)])
def test_diag_fisher_linear(cuda_glue, shape, dtype, masked, strided):
    B, T, I, O = shape
    x, g, mask = _inputs(B, T, I, O, dtype, masked, strided)
    G = torch.einsum("bto,bt,bti->boi", g.double(), _m64(mask, B, T), x.double())
    _close(cuda_glue.diag_fisher_linear(x, g, mask), (G * G).sum(0))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("masked,strided", [(False, False), (True, True)])
def test_subspace_grads(cuda_glue, shape, dtype, masked, strided):
    B, T, I, O = shape
    x, g, mask = _inputs(B, T, I, O, dtype, masked, strided)
    q_in = torch.randn(I, 7).to(dtype)
    q_out = torch.randn(2 * O, 20).to(dtype)[::2]
    ref = torch.einsum("bto,om,bt,bti,in->bmn", g.double(), q_out.double(), _m64(mask, B, T),
                       x.double(), q_in.double())
    _close(cuda_glue.subspace_grads(x, g, q_in, q_out, mask), ref, rtol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("masked,strided", [(False, False), (True, True)])
def test_kfac_factor_and_sketch(cuda_glue, shape, dtype, masked, strided):
    B, T, I, O = shape
    x, _, mask = _inputs(B, T, I, O, dtype, masked, strided)
    x64, m64 = x.double(), _m64(mask, B, T)
    _close(cuda_glue.kfac_factor(x, mask, None), torch.einsum("bti,bt,btj->ij", x64, m64, x64))
    q = torch.randn(I, 9)
    ref = torch.einsum("bti,bt,btj,im,jn->mn", x64, m64, x64, q.double(), q.double())
    _close(cuda_glue.kfac_factor(x, mask, q), ref, rtol=1e-5)
    omega = torch.randn(I, 5).to(dtype)
    ref = torch.einsum("bti,bt,btj,jl->il", x64, m64, x64, omega.double())
    _close(cuda_glue.kfac_sketch(x, omega, mask), ref, rtol=1e-5)


def test_kfac_row_splits_and_symmetry(cuda_glue, monkeypatch):
    """Many row splits (partial sums added by torch) and several mirrored tiles."""
    monkeypatch.setattr(cuda_glue, "_target_blocks", lambda t: 64)
    x = torch.randn(300, 130)
    got = cuda_glue.kfac_factor(x, None, None)
    _close(got, x.double().T @ x.double())
    assert torch.equal(got, got.T)


@pytest.mark.parametrize("w_dtype", DTYPES)
@pytest.mark.parametrize("ab_dtype", [torch.float32, torch.bfloat16])
def test_lora_merge_rounds_once(cuda_glue, w_dtype, ab_dtype):
    O, I, K = 77, 123, 5
    w = torch.randn(I, O).to(w_dtype).T  # non-contiguous [O, I]
    b, a = torch.randn(O, K).to(ab_dtype), torch.randn(K, I).to(ab_dtype)
    exact = w.double() + 0.37 * (b.double() @ a.double())
    w0 = w.clone()
    cuda_glue.lora_merge_(w, b, a, 0.37)
    assert w.dtype == w_dtype and w.stride() == w0.stride()
    if w_dtype == torch.float32:
        _close(w, exact, rtol=1e-6)
    else:
        # one rounding of an fp32 value within fp32 accumulation error of the exact sum:
        # at most half an ulp of the output dtype (plus that tiny error) from the exact value
        ulp = (w.double().abs() * torch.finfo(w_dtype).eps).clamp_min(torch.finfo(w_dtype).tiny)
        assert ((w.double() - exact).abs() <= 0.5 * ulp * (1 + 1e-3) + 1e-6).all()


def test_bad_sizes_raise(cuda_glue):
    """A launch the grid cannot hold is refused with a RuntimeError, not run truncated."""
    x = torch.randn(1, 1, 4)
    with pytest.raises(RuntimeError, match="grid limit"):
        cuda_glue._mod().gram(x.data_ptr(), 0, (0, 4, 1), x.data_ptr(), 0, (0, 4, 1), 0, (0, 0),
                              70000, 1, 4, 4, 16, 1, False, x.data_ptr(), -1, 0)
