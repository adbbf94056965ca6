"""lora_merge_: fuse a LoRA update into a weight in place.

Math (w [O, I], b [O, k], a [k, I], scalar scale):

    w <- round_to(w.dtype)( w + scale * (b @ a) )

The rank-k product and the sum are computed in fp32 and rounded once to w's dtype (round to nearest
even). Kernels never allocate an [O, I] temporary: the work is memory-bound (one read and one write
of w; the product costs 2*O*I*k flops).

On the cpp backend, bf16 w with bf16 factors runs on Intel AMX tiles where the CPU has AMX-BF16
and Linux grants the tile state (``sstmerge.ops.backends()["cpp"].detail`` says ``amx=yes`` or why
not; ``SSTMERGE_AMX=0`` turns it off). The tile unit multiplies bf16 exactly and sums in fp32 like
the FMA path, in another order; it treats fp32-subnormal rank products (|b[o, j] a[j, i]| below
2^-126, about 1.2e-38) as zero.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import InputError
from . import _checks
from .backends import dispatch, glue, resolve

OP = "lora_merge_"


def lora_merge_reference_(w: Tensor, b: Tensor, a: Tensor, scale: float) -> None:
    """Pure-torch reference (allocates an fp32 [O, I] temporary)."""
    merged = w.float() + scale * (b.float() @ a.float())
    w.copy_(merged.to(w.dtype))


def _validate(w, b, a, scale) -> None:
    _checks.tensor(OP, "w", w, ndim=2)
    _checks.tensor(OP, "b", b, ndim=2)
    _checks.tensor(OP, "a", a, ndim=2)
    _checks.same_dtype(OP, b=b, a=a)
    _checks.same_device(OP, w=w, b=b, a=a)
    _checks.dim_eq(OP, "b's rows (w's d_out)", b.shape[0], w.shape[0])
    _checks.dim_eq(OP, "a's columns (w's d_in)", a.shape[1], w.shape[1])
    _checks.dim_eq(OP, "a's rows (b's rank)", a.shape[0], b.shape[1])
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise InputError(f"{OP}: scale must be a Python float, got {type(scale).__name__}")
    if w.requires_grad and torch.is_grad_enabled():
        raise InputError(f"{OP}: w requires grad; call it under torch.no_grad()")


def _lora_merge(w: Tensor, b: Tensor, a: Tensor, scale: float, backend: str) -> None:
    if backend == "torch":
        lora_merge_reference_(w, b, a, scale)
    else:
        glue(backend).lora_merge_(w, b, a, scale)


lora_merge_op = torch.library.custom_op("sstmerge::lora_merge_", mutates_args=("w",))(_lora_merge)


@lora_merge_op.register_fake
def _(w, b, a, scale, backend):
    return None


def lora_merge_(w: Tensor, b: Tensor, a: Tensor, scale: float = 1.0, *, backend: str = "auto") -> Tensor:
    """In place ``w += scale * b @ a`` (fp32 product, one rounding); returns w."""
    _validate(w, b, a, scale)
    dispatch(lora_merge_op, _lora_merge, w, b, a, float(scale), resolve(backend, w.device), mutated=(w,))
    return w
