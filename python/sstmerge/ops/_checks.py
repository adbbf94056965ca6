"""Input validation shared by the ops: each failure is a one-line InputError (a ValueError) naming
the argument."""

from __future__ import annotations

import torch

from ..errors import InputError

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def tensor(op: str, name: str, t, ndim: int | None = None, floating: bool = True) -> None:
    if not isinstance(t, torch.Tensor):
        raise InputError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise InputError(f"{op}: {name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if floating and t.dtype not in FLOAT_DTYPES:
        raise InputError(f"{op}: {name} must be float32, bfloat16 or float16, got {t.dtype}")


def same_dtype(op: str, **named: torch.Tensor) -> None:
    dtypes = {n: t.dtype for n, t in named.items()}
    if len(set(dtypes.values())) > 1:
        desc = ", ".join(f"{n}={d}" for n, d in dtypes.items())
        raise InputError(f"{op}: dtype mix is not supported ({desc}); cast them to one dtype")


def same_device(op: str, **named) -> None:
    devs = {n: t.device for n, t in named.items() if t is not None}
    if len(set(devs.values())) > 1:
        desc = ", ".join(f"{n} on {d}" for n, d in devs.items())
        raise InputError(f"{op}: all tensors must be on one device ({desc})")


def dim_eq(op: str, what: str, got: int, want: int) -> None:
    if got != want:
        raise InputError(f"{op}: {what} is {got}, expected {want}")


def mask(op: str, m, shape: tuple[int, ...]) -> None:
    if m is None:
        return
    tensor(op, "mask", m, floating=False)
    if tuple(m.shape) != tuple(shape):
        raise InputError(f"{op}: mask must have shape {tuple(shape)}, got {tuple(m.shape)}")
    if m.is_complex():
        raise InputError(f"{op}: mask must be bool, integer or float, got {m.dtype}")


def mask_f32(m, shape, device) -> torch.Tensor:
    """The mask as float32 of ``shape`` (all ones when absent)."""
    if m is None:
        return torch.ones(shape, dtype=torch.float32, device=device)
    return m.to(torch.float32)
