"""diag_fisher_linear on every non-reference backend against float64 math, the torch reference and an
independent per-sample autograd loop."""

from __future__ import annotations

import pytest
import torch

import sstmerge.ops as ops
from sstmerge.ops import _cpp
from sstmerge.ops.diag_fisher_linear import diag_fisher_linear_op

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



def ref64(x, g, mask):
    """sum_b (G_b)^2 in float64, G_b = sum_t m g^T x (einsum, all samples at once)."""
    B, T = x.shape[:2]
    m = torch.ones(B, T, dtype=torch.float64) if mask is None else mask.double().cpu()
    G = torch.einsum("bt,bto,bti->boi", m, g.double().cpu(), x.double().cpu())
    return (G * G).sum(0)


def lowp(x, g, mask):
    """The same op computed by torch in x's low precision (every product and sum rounded)."""
    B, T = x.shape[:2]
    m = torch.ones(B, T) if mask is None else mask.float().cpu()
    xc, gc = x.cpu(), g.cpu()
    out = torch.zeros(g.shape[-1], x.shape[-1], dtype=x.dtype)
    for b in range(B):
        G = (gc[b] * m[b, :, None].to(x.dtype)).T @ xc[b]
        out += G * G
    return out


CASES = [  # B, T, I, O, mask, layout
    (3, 37, 123, 77, "bool", "contiguous"),
    (1, 16, 40, 24, None, "transposed"),
    (4, 1, 33, 17, "float", "sliced"),
    (2, 5, 8, 3, "bool", "contiguous"),
]


@pytest.mark.parametrize("dtype", [torch.float32, *LOW], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}T{}I{}O{}-{}-{}".format(*c))
def test_matches_float64(backend, dtype, case):
    B, T, I, O, mk, layout = case
    dev = device_for(backend)
    gen = torch.Generator().manual_seed(seed_of(case))
    x = randn(B, T, I, dtype=dtype, device=dev, layout=layout, gen=gen)
    g = randn(B, T, O, dtype=dtype, device=dev, layout=layout, gen=gen)
    mask = make_mask(B, T, mk, device=dev, gen=gen)
    out = ops.diag_fisher_linear(x, g, mask, backend=backend)
    assert out.dtype == torch.float32 and out.shape == (O, I) and out.device.type == dev.type
    check_close(out, ref64(x, g, mask), dtype, None if dtype == torch.float32 else lowp(x, g, mask))
    if dtype == torch.float32:  # and the torch reference backend agrees
        assert rel_err(out, ops.diag_fisher_linear(x, g, mask, backend="torch")) <= 2e-5


def test_independent_per_sample_autograd(backend):
    """G_b taken from autograd of a real nn.Linear, one sample at a time, then squared and summed."""
    B, T, I, O = 3, 37, 123, 77
    dev = device_for(backend)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(B, T, I, generator=gen)
    g = torch.randn(B, T, O, generator=gen)
    mask = make_mask(B, T, "bool", gen=gen)
    lin = torch.nn.Linear(I, O, bias=False).double()
    expect = torch.zeros(O, I, dtype=torch.float64)
    for b in range(B):
        lin.zero_grad()
        y = lin(x[b].double())  # [T, O]
        # d/dW of sum_t m_t <g_t, W x_t> is G_b = sum_t m_t g_t x_t^T
        (y * g[b].double() * mask[b, :, None].double()).sum().backward()
        expect += lin.weight.grad**2
    out = ops.diag_fisher_linear(x.to(dev), g.to(dev), mask.to(dev), backend=backend)
    assert rel_err(out, expect) <= 2e-5


def test_long_sequences_chunked(backend):
    """T above the cpp kernel's token chunk (384): G_b is accumulated over chunks before squaring."""
    B, T, I, O = 2, 400, 20, 35
    dev = device_for(backend)
    gen = torch.Generator().manual_seed(3)
    x = randn(B, T, I, device=dev, gen=gen)
    g = randn(B, T, O, device=dev, gen=gen)
    mask = make_mask(B, T, "bool", device=dev, gen=gen)
    mask[1, :] = True
    out = ops.diag_fisher_linear(x, g, mask, backend=backend)
    check_close(out, ref64(x, g, mask), torch.float32)


def test_fully_masked_is_zero(backend):
    dev = device_for(backend)
    x = torch.randn(2, 6, 10, device=dev)
    g = torch.randn(2, 6, 7, device=dev)
    out = ops.diag_fisher_linear(x, g, torch.zeros(2, 6, dtype=torch.bool, device=dev), backend=backend)
    assert torch.equal(out.cpu(), torch.zeros(7, 10))


@pytest.mark.parametrize("isa", runnable_isas())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_cpp_isa_variants(isa, dtype):
    """Every ISA variant this CPU runs (avx512 / avx2 / generic) on an odd, masked, strided case."""
    gen = torch.Generator().manual_seed(11)
    x = randn(3, 37, 123, dtype=dtype, layout="transposed", gen=gen)
    g = randn(3, 37, 77, dtype=dtype, layout="sliced", gen=gen)
    mask = make_mask(3, 37, "float", gen=gen)
    out = _cpp.diag_fisher_linear(x, g, mask, isa=isa)
    check_close(out, ref64(x, g, mask), dtype, None if dtype == torch.float32 else lowp(x, g, mask))


def test_opcheck(backend):
    dev = device_for(backend)
    x = torch.randn(2, 5, 9, device=dev)
    g = torch.randn(2, 5, 6, device=dev)
    mask = make_mask(2, 5, "bool", device=dev)
    torch.library.opcheck(diag_fisher_linear_op, (x, g, mask, backend))
    torch.library.opcheck(diag_fisher_linear_op, (x, g, None, backend))


@pytest.mark.parametrize(
    "bad, name",
    [
        (lambda x, g, m: (x, g[:, :4], m), "token count"),
        (lambda x, g, m: (x, g[:1], m), "batch size"),
        (lambda x, g, m: (x, g.half(), m), "dtype mix"),
        (lambda x, g, m: (x, g, m[:, :3]), "mask"),
        (lambda x, g, m: (x, g, torch.ones(2, 5, device="meta")), "mask on meta"),
        (lambda x, g, m: (x[0], g, m), "x must be 3-D"),
        (lambda x, g, m: (x, g.int(), m), "g must be float32"),
    ],
    ids=["tokens", "batch", "dtype", "mask-shape", "device", "x-ndim", "g-dtype"],
)
def test_bad_input(backend, bad, name):
    """Device mismatch is checked with a meta-device tensor (no GPU here): the op must refuse it
    before any backend runs."""
    x, g = torch.randn(2, 5, 9), torch.randn(2, 5, 6)
    m = torch.ones(2, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match=name.split(" on ")[0]):
        ops.diag_fisher_linear(*bad(x, g, m), backend=backend)
