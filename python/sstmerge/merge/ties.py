"""TIES-merging (Yadav et al., 2023) of the two task vectors, one layer at a time.

Full-strength merge: ``M = lam * disjoint_mean(trim(dU, density), trim(dS, density))`` — trim keeps
the ``density`` fraction of largest-magnitude entries of each task vector, the sign of each entry is
elected as the sign of the sum, and the entries agreeing with it are averaged.

Strength alpha moves from the utility model to the TIES merge:

    dM = dU + alpha * (M - dU)         (alpha = 0: dU exactly; alpha = 1: TIES)

The dense result is factored exactly (SVD; ``rank=k`` truncates, residual reported).
"""

from __future__ import annotations

from ..errors import InputError
from .core import Context, Method, no_fisher
from .dense import elect_and_merge, run_dense, trim_top

DEFAULTS = {"density": 0.2, "lam": 1.0, "rank": None}


def run(ctx: Context, alpha: float, *, density: float = 0.2, lam: float = 1.0, rank: int | None = None):
    if not 0.0 < density <= 1.0:
        raise InputError(f"ties: density must be in (0, 1], got {density}")

    def rule(name, dU, dS):
        M = lam * elect_and_merge([trim_top(dU, density), trim_top(dS, density)])
        return dU + alpha * (M - dU), {}

    return run_dense(ctx, "ties", rule, rank)


METHOD = Method("ties", run, DEFAULTS, no_fisher, doc=__doc__)
