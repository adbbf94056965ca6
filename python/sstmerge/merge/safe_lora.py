"""Safe LoRA (Hsu et al., 2024): project the utility update onto the alignment subspace in the
layers where it strays from it; computed with low-rank factors, never an O x O matrix.

Alignment direction per layer, V [O, I]:
  * ``align="safety"`` (default): the safety adapter's own update ``V = s_S B_S A_S``;
  * ``align_model=DIR`` (and ``align_base=DIR``, default: the base model): ``V = W_aligned - W_base``
    read from the two models' safetensors, one layer at a time.
``U_V`` [O, k] = the top-k left singular vectors of V (``align_rank=k``; default: all nonzero
ones for the adapter's V, the safety adapter's rank for a model pair). For the adapter, V's column
space is ``col(B_S R^T)`` with ``A_S^T = Q R``, so U_V comes from an [O, r] SVD. For a model pair
U_V comes from an SVD of the [O, I] difference (randomized ``svd_lowrank`` when min(O, I) > 2048).
The projector ``P = U_V U_V^T`` is applied as ``P dU = U_V (U_V^T s_U B_U) A_U``. (The paper's
``C = V V^T / ||V||_F`` is not a projector; the orthonormal one is used here, as in its intent.)

Selection: ``cos_L = <dU, P dU> / (||dU|| ||P dU||) = ||P dU|| / ||dU||`` (P an orthogonal
projector), from r x r products; layers with ``cos_L < threshold`` are projected.
Full-strength merge: ``M = P dU (selected layers) or dU (others), + dS`` (``add_safety=True``).
Strength alpha moves from the utility model to it:

    dM = dU - alpha * [selected] (I - P) dU + alpha * add_safety * dS      (alpha = 0: dU exactly)

Factors: ``[s_U B_U - alpha [sel] (s_U B_U - U_V U_V^T s_U B_U), alpha s_S B_S] @ [A_U; A_S]``.
"""

from __future__ import annotations

import torch

from ..errors import InputError
from .core import Context, Method, no_fisher, stack

DEFAULTS = {"threshold": 0.5, "align_rank": None, "align_model": None, "align_base": None, "add_safety": True}


class Alignment:
    """Per-layer alignment basis U_V (fp64)."""

    def __init__(self, ctx: Context, align_rank=None, align_model=None, align_base=None):
        self.ctx = ctx
        self.k = align_rank
        self.pair = None
        if align_base is not None and align_model is None:
            raise InputError("align_base needs align_model (the aligned model whose difference from align_base is V)")
        if align_model is not None:
            from .writers import ModelFiles, resolve_model_dir

            self.pair = (ModelFiles(resolve_model_dir(str(align_model)), "aligned model"),
                         ModelFiles(resolve_model_dir(str(align_base or ctx.base)), "alignment base model"))

    def basis(self, name: str) -> tuple[torch.Tensor, dict]:
        u, s = self.ctx.pair(name)
        if self.pair is None:
            Qa, Ra = torch.linalg.qr(s.A.double().T)  # A_S^T = Q R, so B_S A_S = (B_S R^T) Q^T
            Bv = s.B.double() @ Ra.T
            U, sv, _ = torch.linalg.svd(Bv, full_matrices=False)
            k_num = int((sv > (sv[0] * 1e-6 if sv.numel() and sv[0] > 0 else float("inf"))).sum())
            k = k_num if self.k is None else min(int(self.k), k_num)
            if k == 0:
                raise InputError(f"safe_lora: the safety update of layer {name} is zero, so it gives no alignment direction")
            return U[:, :k], {"align_rank": k, "align_source": "safety_adapter"}
        aligned, base = self.pair
        key = f"{name}.weight"
        Wa, Wb = aligned.get(key).double(), base.get(key).double()
        if Wa.shape != Wb.shape or tuple(Wa.shape) != u.shape:
            raise InputError(f"safe_lora: layer {name} is {tuple(Wa.shape)} in the aligned model and {tuple(Wb.shape)} in its base, "
                             f"the adapters expect {u.shape}; use models of the adapters' architecture")
        V = Wa - Wb
        k = int(self.k) if self.k is not None else max(s.rank, 1)
        if min(V.shape) > 2048:
            gen_state = torch.random.get_rng_state()
            torch.manual_seed(self.ctx.layer_seed(name))
            U, sv, _ = torch.svd_lowrank(V, q=min(k + 10, min(V.shape)), niter=4)
            torch.random.set_rng_state(gen_state)
        else:
            U, sv, _ = torch.linalg.svd(V, full_matrices=False)
        if not sv.numel() or not sv[0] > 0:
            raise InputError(f"safe_lora: the aligned and base models are identical in layer {name}; no alignment direction")
        k = min(k, int((sv > sv[0] * 1e-6).sum()))
        return U[:, :k].contiguous(), {"align_rank": k, "align_source": "model_pair"}


def cosine(u, U_V: torch.Tensor) -> float:
    """||P dU||_F / ||dU||_F from r x r products (1.0 for a zero update: nothing to project)."""
    B, A = u.B.double(), u.A.double()
    AAt = A @ A.T
    full = float(torch.trace((B.T @ B) @ AAt))
    if full <= 0:
        return 1.0
    Bp = U_V.T @ B
    proj = float(torch.trace((Bp.T @ Bp) @ AAt))
    return (max(proj, 0.0) / full) ** 0.5


def run(ctx: Context, alpha: float, *, threshold: float = 0.5, align_rank=None, align_model=None, align_base=None,
        add_safety: bool = True):
    al = Alignment(ctx, align_rank, align_model, align_base)
    layers, diags = {}, {}
    for name in ctx.iterate("safe_lora"):
        u, s = ctx.pair(name)
        U_V, info = al.basis(name)
        cos = cosine(u, U_V)
        sel = cos < threshold
        BU = u.scale * u.B.double()
        if sel:
            BU = BU - alpha * (BU - U_V @ (U_V.T @ BU))
        layers[name] = stack([(1.0, BU.float(), u.A), ((alpha * s.scale) if add_safety else 0.0, s.B, s.A)])
        diags[name] = {**info, "cosine": cos, "projected": bool(sel), "rank": layers[name].rank}
    n_sel = sum(d["projected"] for d in diags.values())
    return layers, {"projected_layers": n_sel, "layers": diags}


METHOD = Method("safe_lora", run, DEFAULTS, no_fisher, doc=__doc__)
