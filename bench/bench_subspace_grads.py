"""subspace_grads: cpp vs the torch reference (project with two GEMMs, then a batched product; the
reference is the limit row: it is torch's GEMMs doing the same flops)."""

from __future__ import annotations

import pytest
import torch

import sstmerge.ops as ops
from _timing import assert_agree, run


@pytest.mark.parametrize("name", ["torch_reference", "cpp"])
def bench_subspace_grads(benchmark, mode, name):
    B, T, I, O, m = (16, 128, 1024, 1024, 32) if mode.full else (4, 32, 256, 256, 16)
    gen = torch.Generator().manual_seed(0)
    x, g = torch.randn(B, T, I, generator=gen), torch.randn(B, T, O, generator=gen)
    q_in, q_out = torch.randn(I, m, generator=gen), torch.randn(O, m, generator=gen)
    mask = torch.rand(B, T, generator=gen) > 0.2
    bk = "cpp" if name == "cpp" else "torch"
    fn = lambda: ops.subspace_grads(x, g, q_in, q_out, mask, backend=bk)  # noqa: E731
    assert_agree(name, fn(), ops.subspace_grads(x, g, q_in, q_out, mask, backend="torch"))
    run(benchmark, fn, mode, group=f"subspace_grads B{B} T{T} I{I} O{O} m{m} fp32",
        role="limit" if bk == "torch" else "cpp", dtype="float32", shape=(B, T, I, O, m))
