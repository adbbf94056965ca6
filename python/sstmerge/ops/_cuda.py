"""The cuda backend: launches the CUDA kernels of ``sstmerge._C_cuda`` (one function per op).

Tensors cross as data pointers, strides and dtype codes, with the GPU index and torch's current
stream (``torch.cuda.current_stream(device).cuda_stream``), so the kernels are ordered with the
surrounding torch work and no libtorch is linked. The compiled module has three tiled kernels
(csrc/cuda/kernels.cu); the ops are built from them here:

  diag_fisher_linear  one kernel: F = sum_b G_b * G_b, one G_b tile at a time
  subspace_grads      px = x_b @ q_in and pg = g_b @ q_out (two projections), then per sample
                      out[b] = pg_b^T diag(mask_b) px_b (project first: G_b never exists)
  kfac_factor         gram(x, x) over row splits, or y = x @ q then gram(y, y)
  kfac_sketch         y = x @ omega, then gram(x, y)
  lora_merge_         one kernel, in place, one rounding

Temporaries (the fp32 projections, the row-split partial sums, the fp32 mask) are allocated by
torch on the op's stream, so the caching allocator keeps them alive until the kernels ran.
A refused or failed launch raises RuntimeError; nothing falls back.
"""

from __future__ import annotations

import importlib
from typing import Optional

import torch
from torch import Tensor

from ._reduce import sum_splits

# dtype codes of csrc/common/numeric.h (sstm::DType)
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
ROWS_PER_CHUNK = 16  # tile::kRows: row splits are multiples of it

_C = None  # sstmerge._C_cuda, imported on first use (tests may substitute a CPU emulation)


def _mod():
    global _C
    if _C is None:
        _C = importlib.import_module("sstmerge._C_cuda")
    return _C


def _launch(t: Tensor) -> tuple[int, int]:
    """(GPU index, torch's current stream on it) for a launch on t's device."""
    if t.is_cuda:
        return t.device.index, torch.cuda.current_stream(t.device).cuda_stream
    return -1, 0  # CPU tensors reach here only through the CPU emulation in the tests


def _target_blocks(t: Tensor) -> int:
    """Thread blocks wanted in flight: a few per SM (2 off the GPU, which exercises row splits)."""
    if t.is_cuda:
        return 4 * torch.cuda.get_device_properties(t.device).multi_processor_count
    return 2


def _mask(mask: Optional[Tensor]) -> tuple[Optional[Tensor], int, tuple[int, ...]]:
    """(fp32 mask or None, its pointer or 0, its strides or zeros)."""
    if mask is None:
        return None, 0, (0,) * 2
    m = mask.to(torch.float32)
    return m, m.data_ptr(), m.stride()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def diag_fisher_linear(x: Tensor, g: Tensor, mask: Optional[Tensor]) -> Tensor:
    B, T, I = x.shape
    O = g.shape[2]
    out = torch.empty((O, I), dtype=torch.float32, device=x.device)
    m, mp, ms = _mask(mask)  # m holds the fp32 mask the kernel reads
    _mod().diag_fisher_linear(
        x.data_ptr(), x.stride(), g.data_ptr(), g.stride(), DTYPE_CODES[x.dtype], mp, ms,
        B, T, I, O, out.data_ptr(), *_launch(x),
    )
    return out


def _gram(
    a: Tensor, b: Tensor, w: Optional[Tensor], *, symmetric: bool = False, split_rows: bool = False
) -> Tensor:
    """out[n] = a[n]^T diag(w[n]) b[n] in fp32, [batch, M, L], for a [batch, rows, M] and
    b [batch, rows, L] (any strides, batch stride 0 to share one matrix) and w [batch, rows] fp32
    or None. With split_rows the rows are split over enough blocks to fill the GPU, and the
    partial sums are added pairwise (sum_splits)."""
    batch, rows, M = a.shape
    L = b.shape[2]
    if batch == 0 or rows == 0 or M == 0 or L == 0:
        return torch.zeros((batch, M, L), dtype=torch.float32, device=a.device)
    splits = 1
    if split_rows:
        tiles = _cdiv(M, 64) * _cdiv(L, 64)
        splits = max(1, min(_cdiv(rows, ROWS_PER_CHUNK), _target_blocks(a) // (tiles * batch)))
    rows_per_split = _cdiv(_cdiv(rows, splits), ROWS_PER_CHUNK) * ROWS_PER_CHUNK
    splits = _cdiv(rows, rows_per_split)
    out = torch.empty((batch * splits, M, L), dtype=torch.float32, device=a.device)
    wp, ws = (0, (0, 0)) if w is None else (w.data_ptr(), w.stride())
    _mod().gram(
        a.data_ptr(), DTYPE_CODES[a.dtype], a.stride(),
        b.data_ptr(), DTYPE_CODES[b.dtype], b.stride(),
        wp, ws, batch, rows, M, L, rows_per_split, splits, symmetric, out.data_ptr(), *_launch(a),
    )
    if splits > 1:
        return sum_splits(out.view(batch, splits, M, L).transpose(0, 1))
    return out


def _project(x: Tensor, q: Tensor) -> Tensor:
    """x[n] @ q in fp32, [batch, T, L], for x [batch, T, K] and q [K, L]: the gram product of
    x[n]^T (a transposed view: rows K, cols T) with q (rows K; batch stride 0)."""
    return _gram(x.transpose(1, 2), q.unsqueeze(0).expand(x.shape[0], -1, -1), None)


def subspace_grads(
    x: Tensor, g: Tensor, q_in: Tensor, q_out: Tensor, mask: Optional[Tensor]
) -> Tensor:
    px = _project(x, q_in)  # [B, T, m_in]
    pg = _project(g, q_out)  # [B, T, m_out]
    m, _, _ = _mask(mask)
    return _gram(pg, px, m)


def _rows(x: Tensor, mask: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
    """x as [1, N, d] rows (a view when x's strides allow, else a copy) and the mask as [1, N]."""
    x3 = x.reshape(1, -1, x.shape[-1])
    m, _, _ = _mask(mask)
    return x3, (None if m is None else m.reshape(1, -1))


def kfac_factor(x: Tensor, mask: Optional[Tensor], q: Optional[Tensor]) -> Tensor:
    x3, m = _rows(x, mask)
    y = x3 if q is None else _project(x3, q)
    return _gram(y, y, m, symmetric=True, split_rows=True)[0]


def kfac_sketch(x: Tensor, omega: Tensor, mask: Optional[Tensor]) -> Tensor:
    x3, m = _rows(x, mask)
    y = _project(x3, omega)
    return _gram(x3, y, m, split_rows=True)[0]


def lora_merge_(w: Tensor, b: Tensor, a: Tensor, scale: float) -> None:
    O, I = w.shape
    K = b.shape[1]
    if w.numel() == 0 or K == 0:
        return
    _mod().lora_merge_(
        w.data_ptr(), DTYPE_CODES[w.dtype], w.stride(), b.data_ptr(), b.stride(),
        a.data_ptr(), a.stride(), DTYPE_CODES[a.dtype], O, I, K, float(scale), *_launch(w),
    )
