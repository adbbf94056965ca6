"""SafeMERGE (Djuhera et al., 2025): merge the safety adapter only into the layers whose utility
update strays from the alignment subspace of an aligned/unaligned model pair.

Selection as in Safe LoRA (:mod:`sstmerge.merge.safe_lora`): ``cos_L = ||P dU|| / ||dU||`` with P the
projector onto the top singular directions of ``V = W_aligned - W_unaligned`` (``align_model``,
``align_base``; default base: the base model); layers with ``cos_L < threshold`` are merged linearly:

    dM = dU + alpha * dS   (selected layers),     dM = dU   (other layers)

exact low-rank factors ``[s_U B_U, alpha s_S B_S] @ [A_U; A_S]``; alpha = 0 gives dU exactly. The
served model is the adapters' base (the paper merges two adapters of one model). The variant that
selects by the safety adapter's own subspace is :mod:`sstmerge.merge.safemerge_adapter`.
"""

from __future__ import annotations

from ..errors import InputError
from .core import Context, Method, from_sweep, no_fisher, stack
from .safe_lora import Alignment, cosine

DEFAULTS = {"threshold": 0.5, "align_rank": None, "align_model": None, "align_base": None}


def selective(ctx: Context, al: Alignment, alphas, threshold: float, desc: str):
    """Each alpha's ``dU + alpha [sel] dS`` and the per-layer diagnostics (both SafeMERGE variants)."""
    out = [({}, {}) for _ in alphas]
    for name in ctx.iterate(desc):
        u, s = ctx.pair(name)
        U_V, info = al.basis(name)
        cos = cosine(u, U_V)
        sel = cos < threshold
        for (layers, diags), a in zip(out, alphas):
            layers[name] = stack([(u.scale, u.B, u.A), ((a * s.scale) if sel else 0.0, s.B, s.A)])
            diags[name] = {**info, "cosine": cos, "merged": bool(sel), "rank": layers[name].rank}
    return [(layers, {"merged_layers": sum(d["merged"] for d in diags.values()), "layers": diags})
            for layers, diags in out]


def sweep(ctx: Context, alphas, *, threshold: float = 0.5, align_rank=None, align_model=None, align_base=None):
    if align_model is None:
        raise InputError("safemerge selects layers by the difference of an aligned and an unaligned model: pass "
                         "align_model (exp1/tune/merge --align-model; the worlds ship one), or use safemerge_adapter, "
                         "which selects by the safety adapter's own update")
    return selective(ctx, Alignment(ctx, align_rank, align_model, align_base, method="safemerge"), alphas, threshold,
                     "safemerge")


METHOD = Method("safemerge", from_sweep(sweep), DEFAULTS, no_fisher, doc=__doc__, sweep=sweep)
