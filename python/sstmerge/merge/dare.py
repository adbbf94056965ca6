"""DARE (Yu et al., 2024): drop and rescale, then merge linearly or with TIES' sign election.

``DARE(d)`` keeps each entry with probability ``density`` and divides the kept entries by
``density`` (so ``E[DARE(d)] = d``); the masks of dU and of dS are drawn in row order from two
numpy PCG64 generators seeded per layer from ``seed``, the layer name and the role (same seed, same
result on every machine): an entry is kept when its uniform 32-bit integer is below
``round(density 2^32)``, i.e. with probability ``density`` to within 2^-33 (torch.rand's fp32 draws
had 2^-24; its CPU generator cost 2.5x as much per entry, ~30 % of DARE's time on large layers).

Full-strength merge: ``variant="linear"``: ``M = DARE(dU) + DARE(dS)``;
``variant="ties"``: ``M = lam * disjoint_mean(DARE(dU), DARE(dS))`` (sign election as in TIES).
Strength alpha moves from the utility model to that merge:

    dM = dU + alpha * (M - dU)         (alpha = 0: dU exactly)

The masks do not depend on alpha: a sweep draws them, and builds M, once per layer.

Factored at rank ``r_U + r_S`` by default (``rank``: see :mod:`sstmerge.merge.dense`).
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import InputError
from .core import Context, Method, from_sweep, no_fisher
from .dense import elect_and_merge, run_dense

DEFAULTS = {"density": 0.5, "variant": "linear", "lam": 1.0, "rank": "auto"}


def keep_mask(shape, density: float, gen: np.random.Generator) -> torch.Tensor:
    """Bernoulli(density) keep mask (bool, row-major draws): uint32 draws below round(density 2^32)."""
    n = int(np.prod(shape))
    cut = np.uint64(round(density * 2**32))  # <= 2^32: compared in uint64, so density 1 keeps all
    return torch.from_numpy(gen.integers(0, 1 << 32, n, dtype=np.uint32) < cut).view(shape)


def dare(d: torch.Tensor, density: float, gen: np.random.Generator) -> torch.Tensor:
    if density >= 1.0:
        return d.clone()
    keep = keep_mask(d.shape, density, gen).to(d.device)
    return torch.where(keep, d / density, torch.zeros_like(d))


def sweep(ctx: Context, alphas, *, density: float = 0.5, variant: str = "linear", lam: float = 1.0,
        rank="auto"):
    if not 0.0 < density <= 1.0:
        raise InputError(f"dare: density must be in (0, 1], got {density}")
    if variant not in ("linear", "ties"):
        raise InputError(f"dare: variant must be 'linear' or 'ties', got {variant!r}")

    def prepare(name, dl):  # row blocks come in order: each generator draws its mask row by row
        seed = ctx.layer_seed(name)
        return np.random.Generator(np.random.PCG64(seed)), np.random.Generator(np.random.PCG64(seed + 1))

    def target(name, r0, r1, dU, dS, gens):
        tu, ts = dare(dU, density, gens[0]), dare(dS, density, gens[1])
        return (tu + ts if variant == "linear" else lam * elect_and_merge([tu, ts])), {}

    return run_dense(ctx, f"dare-{variant}", alphas, rank, prepare=prepare, target=target)


METHOD = Method("dare", from_sweep(sweep), DEFAULTS, no_fisher, doc=__doc__, sweep=sweep)
