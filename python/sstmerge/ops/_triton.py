"""The triton backend: launches the Triton kernels of ``sstmerge.kernels`` (one function per op).

This module imports triton, so it is imported only when an op runs with ``backend="triton"``
(:func:`sstmerge.ops.backends.glue`); ``import sstmerge`` does not import it. Inputs are passed as
they are (any strides, fp32 / bf16 / fp16); only the [B, T] mask is converted to fp32. Outputs are
fp32 and accumulated in fp32. On CPU tensors the kernels run in Triton's interpreter
(``TRITON_INTERPRET=1``); :mod:`sstmerge.ops.backends` refuses the backend otherwise.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import triton
from torch import Tensor

from ._reduce import sum_splits

from sstmerge.kernels.diag_fisher_linear import diag_fisher_linear_kernel
from sstmerge.kernels.kfac_factor import masked_gram_kernel, project_kernel
from sstmerge.kernels.lora_merge import lora_merge_kernel
from sstmerge.kernels.subspace_grads import subspace_grads_kernel


def _on_device(t: Tensor):
    """Launch on t's GPU (triton launches on the current device)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _mask_f32(mask: Optional[Tensor], like: Tensor) -> tuple[Tensor, bool]:
    """(mask as fp32, has_mask); a 1-element dummy when there is no mask (never read)."""
    if mask is None:
        return torch.zeros(1, dtype=torch.float32, device=like.device), False
    return mask.to(torch.float32), True


def _native_dot(mask: Optional[Tensor], *tensors: Tensor) -> bool:
    """Whether the compute-bound kernels may dot 16-bit tiles directly (fp32 accumulation on
    tensor cores): on a GPU, all operands bf16 or all fp16, and a mask that is absent or bool
    (so masking is a select, not a multiply that would round in 16 bits). The interpreter's bf16
    dot is wrong, so it always takes the fp32 path."""
    dtypes = {t.dtype for t in tensors}
    return (
        all(t.is_cuda for t in tensors)
        and len(dtypes) == 1
        and dtypes <= {torch.bfloat16, torch.float16}
        and (mask is None or mask.dtype == torch.bool)
    )


def _block(n: int, cap: int = 64) -> int:
    """A tile size covering n (at least 16, the minimum tl.dot dimension), at most cap."""
    return min(cap, max(16, triton.next_power_of_2(n)))


def _target_programs(t: Tensor) -> int:
    """Programs wanted in flight: a few per SM on a GPU; 2 in the interpreter (exercises splits)."""
    if t.is_cuda:
        return 4 * torch.cuda.get_device_properties(t.device).multi_processor_count
    return 2


def diag_fisher_linear(x: Tensor, g: Tensor, mask: Optional[Tensor]) -> Tensor:
    B, T, I = x.shape
    O = g.shape[2]
    out = torch.empty((O, I), dtype=torch.float32, device=x.device)
    if out.numel() == 0:
        return out
    m, has_mask = _mask_f32(mask, x)
    ms = m.stride() if has_mask else (0, 0)
    BLOCK_O, BLOCK_I, BLOCK_T = _block(O), _block(I), 32
    grid = (triton.cdiv(O, BLOCK_O), triton.cdiv(I, BLOCK_I))
    with _on_device(x):
        diag_fisher_linear_kernel[grid](
            x, g, m, out,
            B, T, I, O,
            *x.stride(), *g.stride(), *ms, *out.stride(),
            HAS_MASK=has_mask, NATIVE_DOT=_native_dot(mask, x, g),
            BLOCK_O=BLOCK_O, BLOCK_I=BLOCK_I, BLOCK_T=BLOCK_T,
        )
    return out


def subspace_grads(
    x: Tensor, g: Tensor, q_in: Tensor, q_out: Tensor, mask: Optional[Tensor]
) -> Tensor:
    B, T, I = x.shape
    O = g.shape[2]
    m_in, m_out = q_in.shape[1], q_out.shape[1]
    out = torch.empty((B, m_out, m_in), dtype=torch.float32, device=x.device)
    if B == 0 or m_in == 0 or m_out == 0:
        return out.zero_()
    m, has_mask = _mask_f32(mask, x)
    ms = m.stride() if has_mask else (0, 0)
    BLOCK_MO, BLOCK_MI = _block(m_out), _block(m_in)
    grid = (B, triton.cdiv(m_out, BLOCK_MO), triton.cdiv(m_in, BLOCK_MI))
    with _on_device(x):
        subspace_grads_kernel[grid](
            x, g, q_in, q_out, m, out,
            T, I, O, m_in, m_out,
            *x.stride(), *g.stride(), *q_in.stride(), *q_out.stride(), *ms, *out.stride(),
            HAS_MASK=has_mask, BLOCK_T=32, BLOCK_K=64, BLOCK_MO=BLOCK_MO, BLOCK_MI=BLOCK_MI,
        )
    return out


def _rows(x: Tensor, mask: Optional[Tensor]) -> tuple[Tensor, Tensor, bool]:
    """x as [N, d] rows (a view when the strides allow) and the mask as [N] fp32."""
    x2 = x.reshape(-1, x.shape[-1])
    m, has_mask = _mask_f32(mask, x)
    return x2, (m.reshape(-1) if has_mask else m), has_mask


def _project(x2: Tensor, q: Tensor) -> Tensor:
    """y = x2 @ q in fp32, [N, L]."""
    N, K = x2.shape
    L = q.shape[1]
    y = torch.empty((N, L), dtype=torch.float32, device=x2.device)
    if y.numel() == 0:
        return y
    BLOCK_N, BLOCK_L = 32, _block(L)
    grid = (triton.cdiv(N, BLOCK_N), triton.cdiv(L, BLOCK_L))
    project_kernel[grid](
        x2, q, y, N, K, L, *x2.stride(), *q.stride(), *y.stride(),
        BLOCK_N=BLOCK_N, BLOCK_L=BLOCK_L, BLOCK_K=64,
    )
    return y


def _gram(
    a: Tensor, b: Tensor, m: Tensor, has_mask: bool, symmetric: bool, native: bool = False
) -> Tensor:
    """out[i, j] = sum_n m_n a[n, i] b[n, j] (fp32), split over rows when the output is small."""
    N, M = a.shape
    L = b.shape[1]
    if M == 0 or L == 0:
        return torch.zeros((M, L), dtype=torch.float32, device=a.device)
    BLOCK_N = 32
    if symmetric:  # square tiles, so that a tile and its mirror have the same shape
        BLOCK_M = BLOCK_L = _block(M)
    else:
        BLOCK_M, BLOCK_L = _block(M), _block(L)
    tiles = triton.cdiv(M, BLOCK_M) * triton.cdiv(L, BLOCK_L)
    row_blocks = max(1, triton.cdiv(N, BLOCK_N))
    splits = max(1, min(row_blocks, _target_programs(a) // tiles))
    rows_per_split = triton.cdiv(row_blocks, splits) * BLOCK_N
    splits = max(1, triton.cdiv(N, rows_per_split))
    out = torch.empty((splits, M, L), dtype=torch.float32, device=a.device)
    grid = (triton.cdiv(M, BLOCK_M), triton.cdiv(L, BLOCK_L), splits)
    masked_gram_kernel[grid](
        a, b, m, out, N, M, L, rows_per_split,
        *a.stride(), *b.stride(), m.stride(0) if has_mask else 0, *out.stride(),
        HAS_MASK=has_mask, SYMMETRIC=symmetric, NATIVE_DOT=native,
        BLOCK_M=BLOCK_M, BLOCK_L=BLOCK_L, BLOCK_N=BLOCK_N,
    )
    return sum_splits(out)


def kfac_factor(x: Tensor, mask: Optional[Tensor], q: Optional[Tensor]) -> Tensor:
    x2, m, has_mask = _rows(x, mask)
    with _on_device(x):
        if q is None:
            return _gram(x2, x2, m, has_mask, symmetric=True, native=_native_dot(mask, x2))
        y = _project(x2, q)
        return _gram(y, y, m, has_mask, symmetric=True)


def kfac_sketch(x: Tensor, omega: Tensor, mask: Optional[Tensor]) -> Tensor:
    x2, m, has_mask = _rows(x, mask)
    with _on_device(x):
        y = _project(x2, omega)
        return _gram(x2, y, m, has_mask, symmetric=False)


def lora_merge_(w: Tensor, b: Tensor, a: Tensor, scale: float) -> None:
    O, I = w.shape
    K = b.shape[1]
    if w.numel() == 0 or K == 0:
        return
    BLOCK_O, BLOCK_I, BLOCK_K = 64, 64, _block(K, cap=32)
    grid = (triton.cdiv(O, BLOCK_O), triton.cdiv(I, BLOCK_I))
    with _on_device(w):
        lora_merge_kernel[grid](
            w, b, a, O, I, K, float(scale),
            *w.stride(), *b.stride(), *a.stride(),
            W_BF16=w.dtype == torch.bfloat16,
            BLOCK_O=BLOCK_O, BLOCK_I=BLOCK_I, BLOCK_K=BLOCK_K,
        )
