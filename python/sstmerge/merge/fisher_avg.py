"""Fisher-weighted averaging (Matena & Raffel, 2022) with diagonal Fisher, one layer at a time.

With ``F_U``, ``F_S`` the diagonal Fisher [O, I] of the layer's effective weight on the utility and
the safety objective, and ``eps_abs = eps * mean(F_U + F_S)``:

    dM = ((F_U + eps_abs) * dU + alpha * F_S * dS) / (F_U + eps_abs + alpha * F_S)    (entry-wise)

i.e. the Fisher-weighted average of the two models ``W0 + dU`` and ``W0 + dS`` where the safety
model's importance is scaled by alpha and the utility model carries a small floor eps_abs (it wins
where neither objective depends on an entry). alpha = 0 gives dU exactly.
"""

from __future__ import annotations

from ..errors import InputError
from .core import Context, Method
from .dense import run_dense
from .fisher_inputs import diag_linear

DEFAULTS = {"eps": 1e-6, "rank": None}


def _fisher(_opts):
    return [("utility", "diag"), ("safety", "diag")]


def run(ctx: Context, alpha: float, *, eps: float = 1e-6, rank: int | None = None):
    if ctx.fisher is None:
        raise InputError("fisher_avg needs the diag Fisher of both objectives: pass --fisher DIR or --safety-data/--utility-data")
    FUr = ctx.fisher.get("utility", "diag", "fisher_avg")
    FSr = ctx.fisher.get("safety", "diag", "fisher_avg")

    def rule(name, dU, dS):
        shape = tuple(dU.shape)
        FU = diag_linear(FUr, name, shape, "utility Fisher").float()
        FS = diag_linear(FSr, name, shape, "safety Fisher").float()
        ref = float((FU + FS).mean())
        if not ref > 0:
            raise InputError(f"fisher_avg: both Fishers are zero in layer {name}; no gradient reached it (check the Fisher data)")
        FUe = FU + eps * ref
        w = alpha * FS
        merged = (FUe * dU + w * dS) / (FUe + w)
        share = float((w / (FUe + w)).mean())
        return merged, {"mean_safety_weight": share}

    return run_dense(ctx, "fisher_avg", rule, rank)


METHOD = Method("fisher_avg", run, DEFAULTS, _fisher, doc=__doc__)
