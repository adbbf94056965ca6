"""diag_fisher_linear: the diagonal Fisher of a linear layer's weight from inputs and output-gradients.

Math (B samples, T tokens, I = d_in, O = d_out, mask [B, T] with 1 = the token counts):

    G_b = sum_t mask[b, t] * g[b, t]^T x[b, t]          (the per-sample weight gradient, [O, I])
    out = sum_b G_b * G_b                               ([O, I], fp32)

Accumulation is in fp32 for fp32, bf16 and fp16 inputs. Kernels never hold all G_b at once: memory is
O(O*I) plus a tile. Applied to a LoRA module's A and B factors it gives the diagonal Fisher of the
LoRA parameters; applied to a base linear layer, of its weight.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _checks
from .backends import dispatch, glue, resolve

OP = "diag_fisher_linear"


def diag_fisher_linear_reference(x: Tensor, g: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """Pure-torch reference: one sample at a time, memory O(O*I)."""
    B, T, _ = x.shape
    m = _checks.mask_f32(mask, (B, T), x.device)
    out = torch.zeros(g.shape[-1], x.shape[-1], dtype=torch.float32, device=x.device)
    for b in range(B):
        G = (g[b].float() * m[b, :, None]).T @ x[b].float()
        out += G * G
    return out


def _validate(x, g, mask) -> None:
    _checks.tensor(OP, "x", x, ndim=3)
    _checks.tensor(OP, "g", g, ndim=3)
    _checks.same_dtype(OP, x=x, g=g)
    _checks.same_device(OP, x=x, g=g, mask=mask)
    _checks.dim_eq(OP, "g's batch size (dim 0)", g.shape[0], x.shape[0])
    _checks.dim_eq(OP, "g's token count (dim 1)", g.shape[1], x.shape[1])
    _checks.mask(OP, mask, x.shape[:2])


def _diag_fisher_linear(x: Tensor, g: Tensor, mask: Optional[Tensor], backend: str) -> Tensor:
    if backend == "torch":
        return diag_fisher_linear_reference(x, g, mask)
    return glue(backend).diag_fisher_linear(x, g, mask)


diag_fisher_linear_op = torch.library.custom_op("sstmerge::diag_fisher_linear", mutates_args=())(_diag_fisher_linear)


@diag_fisher_linear_op.register_fake
def _(x, g, mask, backend):
    return x.new_empty((g.shape[-1], x.shape[-1]), dtype=torch.float32)


def diag_fisher_linear(
    x: Tensor, g: Tensor, mask: Optional[Tensor] = None, *, backend: str = "auto"
) -> Tensor:
    """``sum_b (G_b * G_b)`` with ``G_b = sum_t mask[b,t] g[b,t]^T x[b,t]``; returns [O, I] fp32.

    x: [B, T, I] layer inputs; g: [B, T, O] gradients of the loss w.r.t. the layer outputs (same
    dtype as x); mask: [B, T] (bool or 0/1) or None; backend: "auto", "torch", "cpp", "cuda",
    "triton".
    """
    _validate(x, g, mask)
    return dispatch(diag_fisher_linear_op, _diag_fisher_linear, x, g, mask, resolve(backend, x.device))
