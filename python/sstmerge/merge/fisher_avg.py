"""Fisher-weighted averaging (Matena & Raffel, 2022) with diagonal Fisher, one layer at a time.

With ``F_U``, ``F_S`` the diagonal Fisher [O, I] of the layer's effective weight on the utility and
the safety objective, and ``eps_abs = eps * mean(F_U + F_S)``:

    dM = ((F_U + eps_abs) * dU + alpha * F_S * dS) / (F_U + eps_abs + alpha * F_S)    (entry-wise)

i.e. the Fisher-weighted average of the two models ``W0 + dU`` and ``W0 + dS`` where the safety
model's importance is scaled by alpha and the utility model carries a small floor eps_abs (it wins
where neither objective depends on an entry). alpha = 0 gives dU exactly.

Fisher resolution (``pooled``): by default a ``diag_pool`` Fisher — exact for layers with at most
POOL_MAX_ENTRIES (2^20) weights, tile means for larger ones (Qwen2.5-14B: 2x2 to 8x8 tiles; the
exact [O, I] Fishers would be ~53 GB per role); ``pooled=False`` asks for the exact ``diag``.
An exact ``diag`` result is used whenever it is given. The rule runs on row blocks; the result is
factored at rank ``r_U + r_S`` by default, every alpha of a sweep projected onto one range per
layer (``rank``, the range: see :mod:`sstmerge.merge.dense`). ``fisher_at``: where both Fishers
are taken, ``own`` (each adapter's model; default), ``base`` or ``merged`` (:mod:`sstmerge.merge.fisher_inputs`).
"""

from __future__ import annotations

import torch

from ..errors import InputError
from ..fisher.restrict import tile_counts
from .core import Context, Method, from_sweep
from .dense import run_dense
from .fisher_inputs import DiagLayer, at_kind

DEFAULTS = {"eps": 1e-6, "rank": "auto", "pooled": True, "fisher_at": "own"}


def _kinds(opts) -> tuple[str, ...]:
    at = opts.get("fisher_at", "own")
    return tuple(at_kind(k, at) for k in (("diag", "diag_pool") if opts.get("pooled", True) else ("diag",)))


def _fisher(opts):
    kind = at_kind("diag_pool" if opts.get("pooled", True) else "diag", opts.get("fisher_at", "own"))
    return [("utility", kind), ("safety", kind)]


def sweep(ctx: Context, alphas, *, eps: float = 1e-6, rank="auto", pooled: bool = True, fisher_at: str = "own"):
    if ctx.fisher is None:
        raise InputError("fisher_avg needs the diag Fisher of both objectives: pass --fisher DIR or --safety-data/--utility-data")
    kinds = _kinds({"pooled": pooled, "fisher_at": fisher_at})
    FUr = ctx.fisher.first("utility", kinds, "fisher_avg")[1]
    FSr = ctx.fisher.first("safety", kinds, "fisher_avg")[1]

    def prepare(name, dl):
        FU = DiagLayer(FUr, name, dl.shape, "utility Fisher")
        FS = DiagLayer(FSr, name, dl.shape, "safety Fisher")
        O, I = dl.shape
        total = 0.0
        for D in (FU, FS):  # sum over all O x I entries = sum over tiles of count x tile mean
            total += float((D.P.double() * tile_counts(O, I, D.po, D.pi).double()).sum())
        ref = total / (O * I)
        if not ref > 0:
            raise InputError(f"fisher_avg: both Fishers are zero in layer {name}; no gradient reached it (check the Fisher data)")
        return FU, FS, eps * ref

    def rule(name, alphas, r0, r1, dU, dS, st):
        FU, FS, floor = st
        t = FS.rows(r0, r1).to(dU.device) / (FU.rows(r0, r1).to(dU.device) + floor)  # F_S / (F_U + eps_abs)
        diff = dS - dU
        out = []
        for alpha in alphas:
            at = alpha * t
            share = at.div_(at + 1.0)  # = alpha F_S / (F_U + eps_abs + alpha F_S)
            merged = share * diff + dU                 # = (F_U' dU + alpha F_S dS) / (F_U' + alpha F_S)
            out.append((merged, {"mean_safety_weight": float(share.sum(dim=-1).double().sum()),
                                 **({"fisher_tiles": FU.po * FU.pi} if r0 == 0 else {})}))
        return out

    return run_dense(ctx, "fisher_avg", alphas, rank, prepare=prepare, rule=rule)


METHOD = Method("fisher_avg", from_sweep(sweep), DEFAULTS, _fisher, doc=__doc__, sweep=sweep)
