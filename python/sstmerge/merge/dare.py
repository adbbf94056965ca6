"""DARE (Yu et al., 2024): drop and rescale, then merge linearly or with TIES' sign election.

``DARE(d)`` keeps each entry with probability ``density`` and divides the kept entries by
``density`` (so ``E[DARE(d)] = d``); the mask is drawn from a generator seeded per layer from
``seed`` and the layer name (same seed, same result).

Full-strength merge: ``variant="linear"``: ``M = DARE(dU) + DARE(dS)``;
``variant="ties"``: ``M = lam * disjoint_mean(DARE(dU), DARE(dS))`` (sign election as in TIES).
Strength alpha moves from the utility model to that merge:

    dM = dU + alpha * (M - dU)         (alpha = 0: dU exactly)
"""

from __future__ import annotations

import torch

from ..errors import InputError
from .core import Context, Method, no_fisher
from .dense import elect_and_merge, run_dense

DEFAULTS = {"density": 0.5, "variant": "linear", "lam": 1.0, "rank": None}


def dare(d: torch.Tensor, density: float, gen: torch.Generator) -> torch.Tensor:
    if density >= 1.0:
        return d.clone()
    keep = torch.rand(d.shape, generator=gen, dtype=torch.float32) < density
    return torch.where(keep, d / density, torch.zeros_like(d))


def run(ctx: Context, alpha: float, *, density: float = 0.5, variant: str = "linear", lam: float = 1.0,
        rank: int | None = None):
    if not 0.0 < density <= 1.0:
        raise InputError(f"dare: density must be in (0, 1], got {density}")
    if variant not in ("linear", "ties"):
        raise InputError(f"dare: variant must be 'linear' or 'ties', got {variant!r}")

    def rule(name, dU, dS):
        gen = torch.Generator().manual_seed(ctx.layer_seed(name))
        tu, ts = dare(dU, density, gen), dare(dS, density, gen)
        M = tu + ts if variant == "linear" else lam * elect_and_merge([tu, ts])
        return dU + alpha * (M - dU), {}

    return run_dense(ctx, f"dare-{variant}", rule, rank)


METHOD = Method("dare", run, DEFAULTS, no_fisher, doc=__doc__)
