"""Shared driver of the dense-delta methods (TIES, DARE, diagonal Fisher averaging).

For each layer, one at a time: build ``dU`` and ``dS`` [O, I] (fp32), apply the method's entry-wise
rule, and factor the result exactly with :func:`sstmerge.merge.core.factor_dense` (all singular values
above round-off by default; ``rank=k`` truncates and reports the relative residual).
"""

from __future__ import annotations

from typing import Callable

import torch

from .core import Context, factor_dense


def run_dense(ctx: Context, desc: str, rule: Callable, rank: int | None):
    layers, diags = {}, {}
    for name in ctx.iterate(desc):
        u, s = ctx.pair(name)
        dU, dS = u.delta(), s.delta()
        merged, info = rule(name, dU, dS)
        f, finfo = factor_dense(merged, rank)
        layers[name] = f
        diags[name] = {**info, **finfo}
        del dU, dS, merged
    return layers, {"layers": diags}


def trim_top(t: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``density`` fraction of entries of largest magnitude (ties at the cut kept), zero the rest."""
    if density >= 1.0:
        return t.clone()
    k = int(round(density * t.numel()))
    if k <= 0:
        return torch.zeros_like(t)
    thresh = t.abs().flatten().kthvalue(t.numel() - k + 1).values
    return torch.where(t.abs() >= thresh, t, torch.zeros_like(t))


def elect_and_merge(taus: list[torch.Tensor]) -> torch.Tensor:
    """TIES' sign election and disjoint mean: the elected sign of an entry is the sign of the sum of
    the (trimmed) task vectors; the merged entry is the mean of the entries that agree with it
    (zero entries do not count)."""
    total = sum(taus)
    sign = torch.sign(total)
    num = torch.zeros_like(total)
    cnt = torch.zeros_like(total)
    for t in taus:
        agree = (torch.sign(t) == sign) & (t != 0)
        num += torch.where(agree, t, torch.zeros_like(t))
        cnt += agree.to(t.dtype)
    return num / cnt.clamp_min(1.0)
