"""kfac_factor and kfac_sketch: Kronecker factors of a linear layer (input Gram matrices).

Math (x [..., I] rows x_n, mask [...] with 1 = the row counts, q [I, m], omega [I, l]):

    kfac_factor(x, mask)      = sum_n mask_n x_n x_n^T                     ([I, I], fp32)
    kfac_factor(x, mask, q)   = sum_n mask_n (q^T x_n)(q^T x_n)^T          ([m, m], fp32)
    kfac_sketch(x, omega, mask) = sum_n mask_n x_n (x_n^T omega)           ([I, l], fp32)

kfac_sketch is the single-pass randomized range sketch of the factor, for layers too wide for a
dense [I, I] matrix: the factor's range is orth(kfac_sketch(x, omega)) for a Gaussian omega.
Applied to layer inputs it gives the input factor A; applied to output-gradients, the factor G.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..errors import InputError
from . import _checks
from .backends import dispatch, glue, resolve

OP_FACTOR = "kfac_factor"
OP_SKETCH = "kfac_sketch"


def _rows(x: Tensor, mask: Optional[Tensor]):
    xf = x.reshape(-1, x.shape[-1]).float()
    m = _checks.mask_f32(mask, x.shape[:-1], x.device).reshape(-1, 1)
    return xf, m


def kfac_factor_reference(x: Tensor, mask: Optional[Tensor] = None, q: Optional[Tensor] = None) -> Tensor:
    xf, m = _rows(x, mask)
    if q is not None:
        xf = xf @ q.float()
    return (xf * m).T @ xf


def kfac_sketch_reference(x: Tensor, omega: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    xf, m = _rows(x, mask)
    return (xf * m).T @ (xf @ omega.float())


def _validate_x(op, x, mask) -> None:
    _checks.tensor(op, "x", x)
    if x.dim() < 2:
        raise InputError(f"{op}: x must be at least 2-D ([..., d]), got shape {tuple(x.shape)}")
    _checks.mask(op, mask, x.shape[:-1])


def _kfac_factor(x: Tensor, mask: Optional[Tensor], q: Optional[Tensor], backend: str) -> Tensor:
    if backend == "torch":
        return kfac_factor_reference(x, mask, q)
    return glue(backend).kfac_factor(x, mask, q)


kfac_factor_op = torch.library.custom_op("sstmerge::kfac_factor", mutates_args=())(_kfac_factor)


@kfac_factor_op.register_fake
def _(x, mask, q, backend):
    d = x.shape[-1] if q is None else q.shape[1]
    return x.new_empty((d, d), dtype=torch.float32)


def _kfac_sketch(x: Tensor, omega: Tensor, mask: Optional[Tensor], backend: str) -> Tensor:
    if backend == "torch":
        return kfac_sketch_reference(x, omega, mask)
    return glue(backend).kfac_sketch(x, omega, mask)


kfac_sketch_op = torch.library.custom_op("sstmerge::kfac_sketch", mutates_args=())(_kfac_sketch)


@kfac_sketch_op.register_fake
def _(x, omega, mask, backend):
    return x.new_empty((x.shape[-1], omega.shape[1]), dtype=torch.float32)


def kfac_factor(
    x: Tensor, mask: Optional[Tensor] = None, q: Optional[Tensor] = None, *, backend: str = "auto"
) -> Tensor:
    """``sum_n mask_n x_n x_n^T`` over the rows of x (projected by q when given); fp32."""
    _validate_x(OP_FACTOR, x, mask)
    if q is not None:
        _checks.tensor(OP_FACTOR, "q", q, ndim=2)
        _checks.dim_eq(OP_FACTOR, "q's rows (x's last dim)", q.shape[0], x.shape[-1])
    _checks.same_device(OP_FACTOR, x=x, mask=mask, q=q)
    return dispatch(kfac_factor_op, _kfac_factor, x, mask, q, resolve(backend, x.device))


def kfac_sketch(
    x: Tensor, omega: Tensor, mask: Optional[Tensor] = None, *, backend: str = "auto"
) -> Tensor:
    """``sum_n mask_n x_n (x_n^T omega)``: a [I, l] range sketch of the factor; fp32."""
    _validate_x(OP_SKETCH, x, mask)
    _checks.tensor(OP_SKETCH, "omega", omega, ndim=2)
    _checks.dim_eq(OP_SKETCH, "omega's rows (x's last dim)", omega.shape[0], x.shape[-1])
    _checks.same_device(OP_SKETCH, x=x, omega=omega, mask=mask)
    return dispatch(kfac_sketch_op, _kfac_sketch, x, omega, mask, resolve(backend, x.device))
