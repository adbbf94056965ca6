"""kfac_factor (dense [I, I] and projected [m, m]) and kfac_sketch: cpp vs the torch reference
(the limit row: torch's GEMM on the same problem; the cpp factor computes only the upper triangle)."""

from __future__ import annotations

import pytest
import torch

import sstmerge.ops as ops
from _timing import assert_agree, run

KINDS = ["factor", "factor_q", "sketch"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ["torch_reference", "cpp"])
def bench_kfac_factor(benchmark, mode, name, kind, dtype):
    N, I, m = (2048, 1024, 64) if mode.full else (256, 256, 16)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N, I, generator=gen).to(dtype)
    mask = torch.rand(N, generator=gen) > 0.2
    q = torch.randn(I, m, generator=gen).to(dtype)
    bk = "cpp" if name == "cpp" else "torch"
    if kind == "factor":
        fn = lambda: ops.kfac_factor(x, mask, backend=bk)  # noqa: E731
    elif kind == "factor_q":
        fn = lambda: ops.kfac_factor(x, mask, q, backend=bk)  # noqa: E731
    else:
        fn = lambda: ops.kfac_sketch(x, q, mask, backend=bk)  # noqa: E731
    ref = {"factor": lambda: ops.kfac_factor(x, mask, backend="torch"),
           "factor_q": lambda: ops.kfac_factor(x, mask, q, backend="torch"),
           "sketch": lambda: ops.kfac_sketch(x, q, mask, backend="torch")}[kind]
    assert_agree(name, fn(), ref(), rtol=1e-4 if dtype == torch.float32 else 2e-2)
    run(benchmark, fn, mode, group=f"kfac_{kind} N{N} I{I} m{m} {str(dtype)[6:]}",
        role="limit" if bk == "torch" else "cpp", dtype=dtype, shape=(N, I, m))
