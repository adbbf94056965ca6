"""kfac_factor and kfac_sketch on every non-reference backend against float64 math."""

from __future__ import annotations

import pytest
import torch

import sstmerge.ops as ops
from sstmerge.ops import _cpp
from sstmerge.ops.kfac_factor import kfac_factor_op, kfac_sketch_op

from opsutil import (
    LOW,
    check_close,
    device_for,
    make_mask,
    randn,
    rel_err,
    runnable_isas,
    seed_of,
)



def rows64(x, mask):
    xr = x.double().cpu().reshape(-1, x.shape[-1])
    m = torch.ones(xr.shape[0], dtype=torch.float64) if mask is None else mask.double().cpu().reshape(-1)
    return xr, m


def factor64(x, mask, q=None):
    xr, m = rows64(x, mask)
    if q is not None:
        xr = xr @ q.double().cpu()
    return (xr * m[:, None]).T @ xr


def sketch64(x, omega, mask):
    xr, m = rows64(x, mask)
    return (xr * m[:, None]).T @ (xr @ omega.double().cpu())


def factor_low(x, mask, q=None):
    xr = x.cpu().reshape(-1, x.shape[-1])
    m = torch.ones(xr.shape[0]) if mask is None else mask.float().cpu().reshape(-1)
    if q is not None:
        xr = xr @ q.cpu().to(x.dtype)
    return (xr * m[:, None].to(x.dtype)).T @ xr


def sketch_low(x, omega, mask):
    xr = x.cpu().reshape(-1, x.shape[-1])
    m = torch.ones(xr.shape[0]) if mask is None else mask.float().cpu().reshape(-1)
    return (xr * m[:, None].to(x.dtype)).T @ (xr @ omega.cpu().to(x.dtype))


CASES = [  # x shape, m (q columns or None), mask, layout
    ((3, 37, 123), 9, "bool", "contiguous"),
    ((3, 37, 123), None, "float", "transposed"),
    ((1, 1, 33), 4, "bool", "sliced"),
    ((50, 17), None, None, "sliced"),
    ((20, 300), 16, None, "transposed"),
]


def _inputs(case, dtype, dev):
    shape, m, mk, layout = case
    gen = torch.Generator().manual_seed(seed_of(case))
    x = randn(*shape, dtype=dtype, device=dev, layout=layout, gen=gen)
    q = None if m is None else randn(shape[-1], m, dtype=dtype, device=dev, gen=gen)
    mask = None
    if mk is not None:
        lead = shape[:-1]
        mask = make_mask(lead[0], int(torch.tensor(lead[1:]).prod()), mk, device=dev, gen=gen)
        mask = mask.reshape(lead)
    return x, q, mask


@pytest.mark.parametrize("dtype", [torch.float32, *LOW], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x{}-q{}-{}-{}".format(*c))
def test_factor(backend, dtype, case):
    x, q, mask = _inputs(case, dtype, device_for(backend))
    out = ops.kfac_factor(x, mask, q, backend=backend)
    d = x.shape[-1] if q is None else q.shape[1]
    assert out.shape == (d, d) and out.dtype == torch.float32
    assert rel_err(out, out.T) <= 2e-5  # symmetric (the cpp kernel mirrors: exactly)
    low = None if dtype == torch.float32 else factor_low(x, mask, q)
    check_close(out, factor64(x, mask, q), dtype, low)
    if dtype == torch.float32:
        assert rel_err(out, ops.kfac_factor(x, mask, q, backend="torch")) <= 2e-5


@pytest.mark.parametrize("dtype", [torch.float32, *LOW], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x{}-l{}-{}-{}".format(*c))
def test_sketch(backend, dtype, case):
    x, _, mask = _inputs(case, dtype, device_for(backend))
    l = case[1] or 5
    gen = torch.Generator().manual_seed(seed_of(case) + 1)
    omega = randn(x.shape[-1], l, dtype=dtype, device=x.device, layout=case[3], gen=gen)
    out = ops.kfac_sketch(x, omega, mask, backend=backend)
    assert out.shape == (x.shape[-1], l) and out.dtype == torch.float32
    low = None if dtype == torch.float32 else sketch_low(x, omega, mask)
    check_close(out, sketch64(x, omega, mask), dtype, low)


def test_many_rows_chunked(backend):
    """More rows than the cpp kernels' projection chunk (4096), with a mask."""
    dev = device_for(backend)
    gen = torch.Generator().manual_seed(4)
    n = 4500 if dev.type == "cuda" or backend != "triton" else 600
    x = randn(n, 24, device=dev, gen=gen)
    q, omega = randn(24, 6, device=dev, gen=gen), randn(24, 3, device=dev, gen=gen)
    mask = (torch.rand(n, generator=gen) > 0.5).to(dev)
    check_close(ops.kfac_factor(x, mask, q, backend=backend), factor64(x, mask, q), torch.float32)
    check_close(ops.kfac_factor(x, mask, backend=backend), factor64(x, mask), torch.float32)
    check_close(ops.kfac_sketch(x, omega, mask, backend=backend), sketch64(x, omega, mask), torch.float32)


@pytest.mark.parametrize("isa", runnable_isas())
def test_cpp_isa_variants(isa):
    x, q, mask = _inputs(CASES[0], torch.bfloat16, "cpu")
    check_close(_cpp.kfac_factor(x, mask, None, isa=isa), factor64(x, mask), torch.bfloat16,
                factor_low(x, mask))
    check_close(_cpp.kfac_factor(x, mask, q, isa=isa), factor64(x, mask, q), torch.bfloat16,
                factor_low(x, mask, q))
    omega = randn(x.shape[-1], 7, dtype=torch.bfloat16)
    check_close(_cpp.kfac_sketch(x, omega, mask, isa=isa), sketch64(x, omega, mask), torch.bfloat16,
                sketch_low(x, omega, mask))


def test_opcheck(backend):
    dev = device_for(backend)
    x = torch.randn(2, 5, 9, device=dev)
    mask = make_mask(2, 5, "bool", device=dev)
    q, omega = torch.randn(9, 3, device=dev), torch.randn(9, 4, device=dev)
    torch.library.opcheck(kfac_factor_op, (x, mask, None, backend))
    torch.library.opcheck(kfac_factor_op, (x, None, q, backend))
    torch.library.opcheck(kfac_sketch_op, (x, omega, mask, backend))


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda x, m, bk: ops.kfac_factor(x, m[:, :2], backend=bk), "mask"),
        (lambda x, m, bk: ops.kfac_factor(x[0, 0], None, backend=bk), "at least 2-D"),
        (lambda x, m, bk: ops.kfac_factor(x, m, torch.randn(8, 3), backend=bk), "q's rows"),
        (lambda x, m, bk: ops.kfac_factor(x, m, torch.randn(9, 3, device="meta"), backend=bk), "one device"),
        (lambda x, m, bk: ops.kfac_sketch(x, torch.randn(8, 3), m, backend=bk), "omega's rows"),
        (lambda x, m, bk: ops.kfac_sketch(x, torch.randn(9, 3).int(), m, backend=bk), "omega must be float32"),
        (lambda x, m, bk: ops.kfac_sketch(x, torch.randn(9, 3), m.T, backend=bk), "mask"),
    ],
    ids=["mask", "ndim", "q-rows", "device", "omega-rows", "omega-dtype", "sketch-mask"],
)
def test_bad_input(backend, call, name):
    x, m = torch.randn(2, 5, 9), torch.ones(2, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match=name):
        call(x, m, backend)
