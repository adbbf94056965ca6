"""subspace_grads: per-sample weight gradients of a linear layer projected into a subspace.

Math (x [B, T, I], g [B, T, O], q_in [I, m_i], q_out [O, m_o], mask [B, T]):

    out[b] = q_out^T G_b q_in = sum_t mask[b, t] (q_out^T g[b, t]) (q_in^T x[b, t])^T   ([m_o, m_i])

computed as written on the right: project first, then the small per-sample product, so G_b [O, I]
never exists. With vec(out[b]) taken row-major, sum_b vec(out[b]) vec(out[b])^T is the exact Fisher
of the layer's weight restricted to the subspace dW = q_out M q_in^T. Accumulation in fp32.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _checks
from .backends import dispatch, glue, resolve

OP = "subspace_grads"


def subspace_grads_reference(
    x: Tensor, g: Tensor, q_in: Tensor, q_out: Tensor, mask: Optional[Tensor] = None
) -> Tensor:
    """Pure-torch reference: project, then a batched product."""
    B, T, _ = x.shape
    m = _checks.mask_f32(mask, (B, T), x.device)
    px = x.float() @ q_in.float()  # [B, T, m_i]
    pg = (g.float() @ q_out.float()) * m[..., None]  # [B, T, m_o]
    return pg.transpose(1, 2) @ px  # [B, m_o, m_i]


def _validate(x, g, q_in, q_out, mask) -> None:
    _checks.tensor(OP, "x", x, ndim=3)
    _checks.tensor(OP, "g", g, ndim=3)
    _checks.tensor(OP, "q_in", q_in, ndim=2)
    _checks.tensor(OP, "q_out", q_out, ndim=2)
    _checks.same_dtype(OP, x=x, g=g)
    _checks.same_dtype(OP, q_in=q_in, q_out=q_out)
    _checks.same_device(OP, x=x, g=g, q_in=q_in, q_out=q_out, mask=mask)
    _checks.dim_eq(OP, "g's batch size (dim 0)", g.shape[0], x.shape[0])
    _checks.dim_eq(OP, "g's token count (dim 1)", g.shape[1], x.shape[1])
    _checks.dim_eq(OP, "q_in's rows (x's d_in)", q_in.shape[0], x.shape[2])
    _checks.dim_eq(OP, "q_out's rows (g's d_out)", q_out.shape[0], g.shape[2])
    _checks.mask(OP, mask, x.shape[:2])


def _subspace_grads(
    x: Tensor, g: Tensor, q_in: Tensor, q_out: Tensor, mask: Optional[Tensor], backend: str
) -> Tensor:
    if backend == "torch":
        return subspace_grads_reference(x, g, q_in, q_out, mask)
    return glue(backend).subspace_grads(x, g, q_in, q_out, mask)


subspace_grads_op = torch.library.custom_op("sstmerge::subspace_grads", mutates_args=())(_subspace_grads)


@subspace_grads_op.register_fake
def _(x, g, q_in, q_out, mask, backend):
    return x.new_empty((x.shape[0], q_out.shape[1], q_in.shape[1]), dtype=torch.float32)


def subspace_grads(
    x: Tensor,
    g: Tensor,
    q_in: Tensor,
    q_out: Tensor,
    mask: Optional[Tensor] = None,
    *,
    backend: str = "auto",
) -> Tensor:
    """``q_out^T G_b q_in`` for every sample b; returns [B, m_o, m_i] fp32."""
    _validate(x, g, q_in, q_out, mask)
    return dispatch(subspace_grads_op, _subspace_grads, x, g, q_in, q_out, mask, resolve(backend, x.device))
