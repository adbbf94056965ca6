"""Glue between the ops and the C++ CPU kernels (``sstmerge._C``); one function per op.

Tensors cross as ``(data_ptr, dtype code, sizes, strides)`` tuples: no libtorch on the C++ side, so
one build works with any torch version. The kernels read inputs through their strides, so transposed
or sliced views are not copied. Two documented exceptions:

* the mask ([B, T] or [N], small) is passed as a contiguous float32 copy (bool/int masks are
  converted; the kernels skip rows whose mask is 0 and weight the others by the mask value);
* ``kfac_factor`` / ``kfac_sketch`` flatten x to [N, I] with ``reshape``, which copies only when the
  leading dimensions of a view cannot be merged into one stride.

Outputs are fresh contiguous float32 tensors. The kernels use ``torch.get_num_threads()`` OpenMP
threads. ``SSTMERGE_ISA`` (read at import of ``sstmerge._C``) forces a CPU variant; ``isa=`` on the
functions below does the same per call (tests use it).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _C

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _spec(t: Tensor) -> tuple:
    """``(data_ptr, dtype code, sizes, strides)`` of a CPU tensor (strides in elements)."""
    if t.device.type != "cpu":
        raise ValueError(f"the cpp backend runs on CPU tensors, got a tensor on {t.device}")
    return (t.data_ptr(), DTYPE_CODES[t.dtype], list(t.shape), list(t.stride()))


def _mask(mask: Optional[Tensor], shape) -> tuple[int, Optional[Tensor]]:
    """(pointer or 0, the keep-alive tensor) of the mask as contiguous float32 of ``shape``."""
    if mask is None:
        return 0, None
    m = mask.reshape(shape).to(torch.float32).contiguous()
    return m.data_ptr(), m


def _threads() -> int:
    return max(1, torch.get_num_threads())


def diag_fisher_linear(x: Tensor, g: Tensor, mask: Optional[Tensor], isa: str = "") -> Tensor:
    out = torch.zeros(g.shape[-1], x.shape[-1], dtype=torch.float32)
    mp, _keep = _mask(mask, x.shape[:2])
    _C.diag_fisher_linear(out.data_ptr(), _spec(x), _spec(g), mp, _threads(), isa)
    return out


def subspace_grads(
    x: Tensor, g: Tensor, q_in: Tensor, q_out: Tensor, mask: Optional[Tensor], isa: str = ""
) -> Tensor:
    out = torch.empty(x.shape[0], q_out.shape[1], q_in.shape[1], dtype=torch.float32)
    mp, _keep = _mask(mask, x.shape[:2])
    _C.subspace_grads(
        out.data_ptr(), _spec(x), _spec(g), _spec(q_in), _spec(q_out), mp, _threads(), isa
    )
    return out


def _rows(x: Tensor) -> Tensor:
    return x.reshape(-1, x.shape[-1])


def kfac_factor(x: Tensor, mask: Optional[Tensor], q: Optional[Tensor], isa: str = "") -> Tensor:
    d = x.shape[-1] if q is None else q.shape[1]
    out = torch.empty(d, d, dtype=torch.float32)
    xr = _rows(x)
    mp, _keep = _mask(mask, (xr.shape[0],))
    _C.kfac_factor(
        out.data_ptr(), _spec(xr), mp, None if q is None else _spec(q), _threads(), isa
    )
    return out


def kfac_sketch(x: Tensor, omega: Tensor, mask: Optional[Tensor], isa: str = "") -> Tensor:
    out = torch.empty(x.shape[-1], omega.shape[1], dtype=torch.float32)
    xr = _rows(x)
    mp, _keep = _mask(mask, (xr.shape[0],))
    _C.kfac_sketch(out.data_ptr(), _spec(xr), _spec(omega), mp, _threads(), isa)
    return out


def lora_merge_(w: Tensor, b: Tensor, a: Tensor, scale: float, isa: str = "") -> None:
    _C.lora_merge_(_spec(w), _spec(b), _spec(a), float(scale), _threads(), isa)
