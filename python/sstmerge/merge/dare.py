"""DARE (Yu et al., 2024): drop and rescale, then merge linearly or with TIES' sign election.

``DARE(d)`` keeps each entry with probability ``density`` and divides the kept entries by
``density`` (so ``E[DARE(d)] = d``); the masks of dU and of dS are drawn in row order from two
generators seeded per layer from ``seed``, the layer name and the role (same seed, same result).

Full-strength merge: ``variant="linear"``: ``M = DARE(dU) + DARE(dS)``;
``variant="ties"``: ``M = lam * disjoint_mean(DARE(dU), DARE(dS))`` (sign election as in TIES).
Strength alpha moves from the utility model to that merge:

    dM = dU + alpha * (M - dU)         (alpha = 0: dU exactly)

The masks do not depend on alpha: a sweep draws them, and builds M, once per layer.

Factored at rank ``r_U + r_S`` by default (``rank``: see :mod:`sstmerge.merge.dense`).
"""

from __future__ import annotations

import torch

from ..errors import InputError
from .core import Context, Method, from_sweep, no_fisher
from .dense import elect_and_merge, run_dense

DEFAULTS = {"density": 0.5, "variant": "linear", "lam": 1.0, "rank": "auto"}


def dare(d: torch.Tensor, density: float, gen: torch.Generator) -> torch.Tensor:
    if density >= 1.0:
        return d.clone()
    keep = (torch.rand(d.shape, generator=gen, dtype=torch.float32) < density).to(d.device)
    return torch.where(keep, d / density, torch.zeros_like(d))


def sweep(ctx: Context, alphas, *, density: float = 0.5, variant: str = "linear", lam: float = 1.0,
        rank="auto"):
    if not 0.0 < density <= 1.0:
        raise InputError(f"dare: density must be in (0, 1], got {density}")
    if variant not in ("linear", "ties"):
        raise InputError(f"dare: variant must be 'linear' or 'ties', got {variant!r}")

    def prepare(name, dl):  # row blocks come in order: each generator draws its mask row by row
        seed = ctx.layer_seed(name)
        return torch.Generator().manual_seed(seed), torch.Generator().manual_seed((seed + 1) % (2**63 - 1))

    def target(name, r0, r1, dU, dS, gens):
        tu, ts = dare(dU, density, gens[0]), dare(dS, density, gens[1])
        return (tu + ts if variant == "linear" else lam * elect_and_merge([tu, ts])), {}

    return run_dense(ctx, f"dare-{variant}", alphas, rank, prepare=prepare, target=target)


METHOD = Method("dare", from_sweep(sweep), DEFAULTS, no_fisher, doc=__doc__, sweep=sweep)
