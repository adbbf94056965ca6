"""Task arithmetic: ``dM = w_U dU + alpha dS`` per layer, exactly.

Factors: ``B_M = [w_U s_U B_U, alpha s_S B_S]``, ``A_M = [A_U; A_S]`` (rank r_U + r_S; the safety
block is left out when alpha = 0). No cross terms ``B_U A_S``: merging A and B separately
(``(B_U + B_S)(A_U + A_S)``) would add them.
"""

from __future__ import annotations

from .core import Context, Method, no_fisher, stack

DEFAULTS = {"utility_weight": 1.0}


def run(ctx: Context, alpha: float, *, utility_weight: float = 1.0):
    layers = {}
    for name in ctx.iterate("task_arithmetic"):
        u, s = ctx.pair(name)
        layers[name] = stack([(utility_weight * u.scale, u.B, u.A), (alpha * s.scale, s.B, s.A)])
    return layers, {"layers": {n: {"rank": f.rank} for n, f in layers.items()}}


METHOD = Method("task_arithmetic", run, DEFAULTS, no_fisher, doc=__doc__)
