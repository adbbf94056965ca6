"""TIES-merging (Yadav et al., 2023) of the two task vectors, one layer at a time.

Full-strength merge: ``M = lam * disjoint_mean(trim(dU, density), trim(dS, density))`` — trim keeps
the ``density`` fraction of largest-magnitude entries of each task vector, the sign of each entry is
elected as the sign of the sum, and the entries agreeing with it are averaged.

Strength alpha moves from the utility model to the TIES merge:

    dM = dU + alpha * (M - dU)         (alpha = 0: dU exactly; alpha = 1: TIES)

The magnitude cut of each task vector is its exact k-th largest |entry| (k = round(density O I)),
found in a streaming pass; M does not depend on alpha, so a sweep builds it once per layer. The
dense result is factored at rank ``r_U + r_S`` by default (``rank="auto"``; an int k; ``"full"``
for every singular value), with the exact relative residual in the diagnostics (:mod:`sstmerge.merge.dense`).
"""

from __future__ import annotations

import torch

from ..errors import InputError
from .core import Context, Method, from_sweep, no_fisher
from .dense import elect_and_merge, kth_largest_abs, run_dense

DEFAULTS = {"density": 0.2, "lam": 1.0, "rank": "auto"}


def sweep(ctx: Context, alphas, *, density: float = 0.2, lam: float = 1.0, rank="auto"):
    if not 0.0 < density <= 1.0:
        raise InputError(f"ties: density must be in (0, 1], got {density}")

    def prepare(name, dl):
        O, I = dl.shape
        k = int(round(density * O * I))
        if density >= 1.0 or k <= 0:
            return (0.0, 0.0) if density >= 1.0 else (float("inf"), float("inf"))
        return kth_largest_abs(dl.u, O, I, k), kth_largest_abs(dl.s, O, I, k)

    def target(name, r0, r1, dU, dS, cuts):
        tu = torch.where(dU.abs() >= cuts[0], dU, torch.zeros_like(dU))  # ties at the cut kept
        ts = torch.where(dS.abs() >= cuts[1], dS, torch.zeros_like(dS))
        return lam * elect_and_merge([tu, ts]), {}

    return run_dense(ctx, "ties", alphas, rank, prepare=prepare, target=target)


METHOD = Method("ties", from_sweep(sweep), DEFAULTS, no_fisher, doc=__doc__, sweep=sweep)
