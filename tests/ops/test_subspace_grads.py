"""subspace_grads on every non-reference backend against float64 math and the torch reference."""

from __future__ import annotations

import pytest
import torch

import sstmerge.ops as ops
from sstmerge.ops import _cpp
from sstmerge.ops.subspace_grads import subspace_grads_op

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



def ref64(x, g, q_in, q_out, mask):
    """q_out^T G_b q_in with G_b = sum_t m g^T x, in float64 (G_b formed explicitly)."""
    B, T = x.shape[:2]
    m = torch.ones(B, T, dtype=torch.float64) if mask is None else mask.double().cpu()
    G = torch.einsum("bt,bto,bti->boi", m, g.double().cpu(), x.double().cpu())
    return q_out.double().cpu().T @ G @ q_in.double().cpu()


def lowp(x, g, q_in, q_out, mask):
    """The same computed by torch in the inputs' low precision (project first, as the kernels)."""
    B, T = x.shape[:2]
    m = torch.ones(B, T) if mask is None else mask.float().cpu()
    px = x.cpu() @ q_in.cpu()
    pg = (g.cpu() @ q_out.cpu()) * m[..., None].to(x.dtype)
    return pg.transpose(1, 2) @ px


CASES = [  # B, T, I, O, m_i, m_o, mask, layout
    (3, 37, 123, 77, 5, 9, "bool", "contiguous"),
    (1, 16, 40, 24, 16, 3, None, "transposed"),
    (4, 1, 33, 17, 1, 32, "float", "sliced"),
    (5, 7, 8, 3, 2, 2, "bool", "contiguous"),
]


@pytest.mark.parametrize("dtype", [torch.float32, *LOW], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}T{}I{}O{}mi{}mo{}-{}-{}".format(*c))
def test_matches_float64(backend, dtype, case):
    B, T, I, O, mi, mo, mk, layout = case
    dev = device_for(backend)
    gen = torch.Generator().manual_seed(seed_of(case))
    x = randn(B, T, I, dtype=dtype, device=dev, layout=layout, gen=gen)
    g = randn(B, T, O, dtype=dtype, device=dev, layout=layout, gen=gen)
    q_in = randn(I, mi, dtype=dtype, device=dev, layout=layout, gen=gen)
    q_out = randn(O, mo, dtype=dtype, device=dev, gen=gen)
    mask = make_mask(B, T, mk, device=dev, gen=gen)
    out = ops.subspace_grads(x, g, q_in, q_out, mask, backend=backend)
    assert out.dtype == torch.float32 and out.shape == (B, mo, mi)
    expect = ref64(x, g, q_in, q_out, mask)
    low = None if dtype == torch.float32 else lowp(x, g, q_in, q_out, mask)
    check_close(out, expect, dtype, low)
    if mk is not None:  # the empty sample 0 is exactly zero
        assert torch.equal(out[0].cpu(), torch.zeros(mo, mi))
    if dtype == torch.float32:
        ref = ops.subspace_grads(x, g, q_in, q_out, mask, backend="torch")
        assert rel_err(out, ref) <= 2e-5


def test_q_dtype_differs_from_x(backend):
    """q_in/q_out may have their own dtype (fp32 bases for bf16 activations)."""
    dev = device_for(backend)
    gen = torch.Generator().manual_seed(5)
    x = randn(2, 9, 20, dtype=torch.bfloat16, device=dev, gen=gen)
    g = randn(2, 9, 12, dtype=torch.bfloat16, device=dev, gen=gen)
    q_in, q_out = randn(20, 4, device=dev, gen=gen), randn(12, 3, device=dev, gen=gen)
    out = ops.subspace_grads(x, g, q_in, q_out, None, backend=backend)
    assert rel_err(out, ref64(x, g, q_in, q_out, None)) <= 2e-5


@pytest.mark.parametrize("isa", runnable_isas())
def test_cpp_isa_variants(isa):
    gen = torch.Generator().manual_seed(13)
    x = randn(3, 37, 123, layout="transposed", gen=gen)
    g = randn(3, 37, 77, layout="sliced", gen=gen)
    q_in, q_out = randn(123, 6, gen=gen), randn(77, 10, layout="transposed", gen=gen)
    mask = make_mask(3, 37, "bool", gen=gen)
    out = _cpp.subspace_grads(x, g, q_in, q_out, mask, isa=isa)
    check_close(out, ref64(x, g, q_in, q_out, mask), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("isa", runnable_isas())
def test_cpp_blocking_boundaries(isa, B, dtype):
    """cpp blocking: reductions longer than one k slice (I, O > 1024), m wider than one column panel
    (> 32), more tokens than one row block, on rows read in place and on converted strided rows."""
    gen = torch.Generator().manual_seed(17)
    x = randn(B, 29, 1100, dtype=dtype, gen=gen)
    g = randn(B, 29, 1031, dtype=dtype, layout="sliced", gen=gen)
    q_in, q_out = randn(1100, 37, dtype=dtype, gen=gen), randn(1031, 5, dtype=dtype, gen=gen)
    mask = make_mask(B, 29, "float", gen=gen) if B > 1 else None  # make_mask empties sample 0
    out = _cpp.subspace_grads(x, g, q_in, q_out, mask, isa=isa)
    low = None if dtype == torch.float32 else lowp(x, g, q_in, q_out, mask)
    check_close(out, ref64(x, g, q_in, q_out, mask), dtype, low)


def test_opcheck(backend):
    dev = device_for(backend)
    x, g = torch.randn(2, 5, 9, device=dev), torch.randn(2, 5, 6, device=dev)
    q_in, q_out = torch.randn(9, 3, device=dev), torch.randn(6, 2, device=dev)
    mask = make_mask(2, 5, "bool", device=dev)
    torch.library.opcheck(subspace_grads_op, (x, g, q_in, q_out, mask, backend))
    torch.library.opcheck(subspace_grads_op, (x, g, q_in, q_out, None, backend))


@pytest.mark.parametrize(
    "bad, name",
    [
        (lambda x, g, qi, qo, m: (x, g, qi[:-1], qo, m), "q_in"),
        (lambda x, g, qi, qo, m: (x, g, qi, qo[:-1], m), "q_out"),
        (lambda x, g, qi, qo, m: (x, g[:, :4], qi, qo, m), "token count"),
        (lambda x, g, qi, qo, m: (x, g.half(), qi, qo, m), "dtype mix"),
        (lambda x, g, qi, qo, m: (x, g, qi, qo.double(), m), "q_out must be float32"),
        (lambda x, g, qi, qo, m: (x, g, qi, qo, m.T), "mask"),
        (lambda x, g, qi, qo, m: (x, g, qi.to("meta"), qo, m), "one device"),
    ],
    ids=["q_in-rows", "q_out-rows", "tokens", "dtype", "q-dtype", "mask-shape", "device"],
)
def test_bad_input(backend, bad, name):
    """Device mismatch is checked with a meta-device tensor (there is no GPU here)."""
    x, g = torch.randn(2, 5, 9), torch.randn(2, 5, 6)
    q_in, q_out = torch.randn(9, 3), torch.randn(6, 2)
    m = torch.ones(2, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match=name):
        ops.subspace_grads(*bad(x, g, q_in, q_out, m), backend=backend)
