"""Shared helpers of the op tests: the backend parameter, inputs, and error measures.

Tolerances:
* fp32: max |out - ref64| <= FP32_RTOL * max |ref64| (ref64 = the op in float64 on the same
  inputs); fp32 accumulation over <= a few hundred terms stays far below it.
* bf16 / fp16 (flash-attention's rule): the kernel's error against ref64 (computed from the same
  low-precision inputs, upcast) must be at most 2x the error of the op computed by torch in the
  low precision itself (plus a tiny absolute floor for exact-zero cases).
"""

from __future__ import annotations

import importlib
import zlib

import pytest
import torch

import sstmerge.ops as ops

NON_REFERENCE = ("cpp", "triton", "cuda")
FP32_RTOL = 2e-5
LOW = (torch.bfloat16, torch.float16)


def backend_param(request) -> str:
    """The backend of a parametrised test; skips (showing why) when it is unusable here."""
    name = request.param
    st = ops.backends()[name]
    if not st.usable:
        pytest.skip(f"backend {name!r} unusable here: {st.reason}")
    if name == "triton":
        try:
            importlib.import_module("sstmerge.ops._triton")
        except ImportError as e:  # the triton backend has not landed in this tree
            pytest.skip(f"sstmerge.ops._triton is not importable: {e}")
    return name


def device_for(backend: str) -> torch.device:
    if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref| (NaNs in either side count as an infinite error)."""
    out = out.detach().double().cpu()
    ref = ref.detach().double().cpu()
    assert out.shape == ref.shape, (out.shape, ref.shape)
    if torch.isnan(out).any() or torch.isnan(ref).any():
        return float("inf")
    scale = ref.abs().max().item() if ref.numel() else 0.0
    err = (out - ref).abs().max().item() if ref.numel() else 0.0
    return err / scale if scale > 0 else err


def check_close(out, ref64, dtype, lowp=None):
    """fp32: tight relative error; bf16/fp16: at most 2x the error of torch's low-precision run."""
    e = rel_err(out, ref64)
    if dtype == torch.float32:
        assert e <= FP32_RTOL, f"fp32 relative error {e:.3g} > {FP32_RTOL}"
    else:
        assert lowp is not None
        e_low = rel_err(lowp, ref64)
        assert e <= 2 * e_low + 1e-6, f"{dtype}: error {e:.3g} > 2 x torch low-precision {e_low:.3g}"


def randn(*shape, dtype=torch.float32, device="cpu", layout="contiguous", gen=None):
    """A random tensor of `shape` as a contiguous tensor, a transposed view ("transposed": all dims
    reversed in memory) or a strided slice ("sliced": every other element of the last dim)."""
    if layout == "contiguous":
        return torch.randn(*shape, generator=gen).to(dtype).to(device)
    if layout == "transposed":
        t = torch.randn(*reversed(shape), generator=gen).to(dtype).to(device)
        return t.permute(*reversed(range(len(shape))))
    if layout == "sliced":
        t = torch.randn(*shape[:-1], 2 * shape[-1] + 1, generator=gen).to(dtype).to(device)
        return t[..., 1::2]
    raise ValueError(layout)


def make_mask(B, T, kind, device="cpu", gen=None):
    """None, a bool mask with an empty row (sample 0) and random gaps, or a float weight mask."""
    if kind is None:
        return None
    m = torch.rand(B, T, generator=gen) > 0.3
    m[0] = False
    if kind == "bool":
        return m.to(device)
    if kind == "float":  # weights, zero where masked
        return (m.float() * torch.rand(B, T, generator=gen)).to(device)
    raise ValueError(kind)


def runnable_isas() -> list[str]:
    try:
        from sstmerge import _C
    except ImportError:
        return []
    return list(_C.runnable_isas())


def seed_of(case) -> int:
    """A stable seed for a test case (hash() of strings changes between processes)."""
    return zlib.crc32(repr(case).encode())
