"""SafeMERGE (Djuhera et al., 2025): merge the safety adapter only into the layers whose utility
update strays from the alignment subspace.

Selection as in Safe LoRA (:mod:`sstmerge.merge.safe_lora`): ``cos_L = ||P dU|| / ||dU||`` with P the
projector onto the alignment directions (the safety adapter's own update by default, or an
aligned-minus-base model pair); layers with ``cos_L < threshold`` are merged linearly:

    dM = dU + alpha * dS   (selected layers),     dM = dU   (other layers)

exact low-rank factors ``[s_U B_U, alpha s_S B_S] @ [A_U; A_S]``; alpha = 0 gives dU exactly.
"""

from __future__ import annotations

from .core import Context, Method, no_fisher, stack
from .safe_lora import Alignment, cosine

DEFAULTS = {"threshold": 0.5, "align_rank": None, "align_model": None, "align_base": None}


def run(ctx: Context, alpha: float, *, threshold: float = 0.5, align_rank=None, align_model=None, align_base=None):
    al = Alignment(ctx, align_rank, align_model, align_base)
    layers, diags = {}, {}
    for name in ctx.iterate("safemerge"):
        u, s = ctx.pair(name)
        U_V, info = al.basis(name)
        cos = cosine(u, U_V)
        sel = cos < threshold
        layers[name] = stack([(u.scale, u.B, u.A), ((alpha * s.scale) if sel else 0.0, s.B, s.A)])
        diags[name] = {**info, "cosine": cos, "merged": bool(sel), "rank": layers[name].rank}
    return layers, {"merged_layers": sum(d["merged"] for d in diags.values()), "layers": diags}


METHOD = Method("safemerge", run, DEFAULTS, no_fisher, doc=__doc__)
