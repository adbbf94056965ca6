"""Safe LoRA with the alignment direction taken from the safety adapter: ``V = s_S B_S A_S`` by default,
and the safety update added. This is :mod:`sstmerge.merge.safe_lora` with the aligned model read as
base + dS: its ``W_aligned + P dU`` is then ``W_b + dS + P dU``. It needs no model pair, but its
subspace is the very update it adds, so it is not the published method; it stays for comparison.

``U_V`` [O, k] = the top-k left singular vectors of V (``align_rank=k``; default: all nonzero ones).
V's column space is ``col(B_S R^T)`` with ``A_S^T = Q R``, so U_V comes from an [O, r] SVD; with
``align_model`` (and ``align_base``) V comes from that pair instead. Selection as in Safe LoRA
(``cos_L = ||P dU|| / ||dU|| < threshold``). Strength alpha:

    dM = dU - alpha * [sel] (I - P) dU + alpha * add_safety * dS      (alpha = 0: dU exactly)

Factors: ``[s_U B_U - alpha [sel] (s_U B_U - U_V U_V^T s_U B_U), alpha s_S B_S] @ [A_U; A_S]``.
"""

from __future__ import annotations

from .core import Context, Method, from_sweep, no_fisher
from .safe_lora import Alignment, projected

DEFAULTS = {"threshold": 0.5, "align_rank": None, "align_model": None, "align_base": None, "add_safety": True}


def sweep(ctx: Context, alphas, *, threshold: float = 0.5, align_rank=None, align_model=None, align_base=None,
          add_safety: bool = True):
    al = Alignment(ctx, align_rank, align_model, align_base, method="safe_lora_adapter")

    def safety(name, a):
        _u, s = ctx.pair(name)
        return [((a * s.scale) if add_safety else 0.0, s.B, s.A)]

    return projected(ctx, al, alphas, threshold, "safe_lora_adapter", safety)


METHOD = Method("safe_lora_adapter", from_sweep(sweep), DEFAULTS, no_fisher, doc=__doc__, sweep=sweep)
