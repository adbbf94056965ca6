"""SafeMERGE with layers selected by the safety adapter's own update (``V = s_S B_S A_S``, the default
of :mod:`sstmerge.merge.safe_lora_adapter`; ``align_model`` gives a pair instead): ``dU + alpha dS`` in
the layers with ``cos_L = ||P dU|| / ||dU|| < threshold``, ``dU`` elsewhere. It needs no model pair;
the published method (:mod:`sstmerge.merge.safemerge`) selects by an aligned-minus-unaligned difference.
"""

from __future__ import annotations

from .core import Context, Method, from_sweep, no_fisher
from .safe_lora import Alignment
from .safemerge import selective

DEFAULTS = {"threshold": 0.5, "align_rank": None, "align_model": None, "align_base": None}


def sweep(ctx: Context, alphas, *, threshold: float = 0.5, align_rank=None, align_model=None, align_base=None):
    al = Alignment(ctx, align_rank, align_model, align_base, method="safemerge_adapter")
    return selective(ctx, al, alphas, threshold, "safemerge_adapter")


METHOD = Method("safemerge_adapter", from_sweep(sweep), DEFAULTS, no_fisher, doc=__doc__, sweep=sweep)
