"""Safe LoRA (Hsu et al., 2024) as published: serve the aligned model, with the utility update projected
onto the alignment subspace in the layers where it strays from it. Nothing else is added.

Inputs: an aligned/unaligned model pair (``align_model``, ``align_base``; default base: the base model),
read one layer at a time from their safetensors; the served base model ``W_b`` (the adapters' base).

* Alignment direction per layer: ``V = W_aligned - W_unaligned`` [O, I]; ``U_V`` [O, k] its top-k left
  singular vectors (``align_rank=k``; default: the safety adapter's rank), ``P = U_V U_V^T``. (The
  paper's ``C = V V^T / ||V||_F`` is not a projector; the orthonormal one is used, as in its intent.)
* Selection: ``cos_L = <dU, P dU> / (||dU|| ||P dU||) = ||P dU|| / ||dU||``, from r x r products;
  layers with ``cos_L < threshold`` are projected.
* Served model: the aligned model, ``W_aligned = W_b + T`` with ``T = W_aligned - W_b``. In the paper
  the adapter was trained on the aligned model, so ``T = 0`` (``align_model`` is the base model). The
  worlds' adapters were trained on an unaligned base, and their aligned model is a twin (the base
  with an independently trained safety LoRA fused in, :mod:`sstmerge.worlds.aligned`): ``T`` is that
  low-rank update, factored exactly by SVD (round-off singular values dropped). A full-rank ``T`` is an
  error: serve that model as the base instead.

Full strength: ``W_aligned + P dU`` (selected layers) or ``W_aligned + dU`` (others). Strength alpha
moves from the utility model to it:

    dM = alpha T + dU - alpha [sel] (I - P) dU                 (alpha = 0: dU exactly)

Factors ``[s_U B_U - alpha [sel] (s_U B_U - U_V U_V^T s_U B_U), alpha U_T S_T] @ [A_U; Vh_T]``. The
variant that takes V from the safety adapter and adds dS is :mod:`sstmerge.merge.safe_lora_adapter`.
"""

from __future__ import annotations

import torch

from ..errors import InputError
from .core import Context, Method, from_sweep, no_fisher, stack

DEFAULTS = {"threshold": 0.5, "align_rank": None, "align_model": None, "align_base": None}

#: fp32's unit round-off: a stored fp32 weight is exact to u relative, entry by entry.
_U32 = torch.finfo(torch.float32).eps / 2


class Alignment:
    """Per-layer alignment basis ``U_V`` (fp64) from the safety adapter's update or a model pair, and the
    served model's offset ``T = W_aligned - W_base`` for a pair when ``serve_aligned`` (Safe LoRA proper);
    computed once per layer and kept."""

    def __init__(self, ctx: Context, align_rank=None, align_model=None, align_base=None, *, method: str,
                 serve_aligned: bool = False):
        self.ctx, self.k, self.method = ctx, align_rank, method
        self.pair = None
        self.served_is_aligned = True
        self._memo: dict[str, tuple] = {}
        if align_base is not None and align_model is None:
            raise InputError(f"{method}: align_base needs align_model (the aligned model whose difference from "
                             "align_base is V)")
        if align_model is not None:
            from .writers import ModelFiles, resolve_model_dir

            aligned = resolve_model_dir(str(align_model))
            unaligned = resolve_model_dir(str(align_base or ctx.base))
            if aligned.resolve() == unaligned.resolve():
                raise InputError(f"{method}: the aligned model and its unaligned base are both {aligned}; "
                                 "V = W_aligned - W_unaligned would be zero")
            self.pair = (ModelFiles(aligned, "aligned model"), ModelFiles(unaligned, "alignment base model"))
            self.served_is_aligned = not serve_aligned or aligned.resolve() == resolve_model_dir(ctx.base).resolve()
            if not self.served_is_aligned:
                self.base_files = ModelFiles(resolve_model_dir(ctx.base))

    def basis(self, name: str) -> tuple[torch.Tensor, dict]:
        if name not in self._memo:
            self._memo[name] = self._adapter_basis(name) if self.pair is None else self._pair_basis(name)
        U_V, info, _T = self._memo[name]
        return U_V, info

    def served_offset(self, name: str):
        """``(U_T S_T, Vh_T)`` with ``U_T S_T Vh_T = W_aligned - W_base`` (None when the base is the aligned model)."""
        self.basis(name)
        return self._memo[name][2]

    def _adapter_basis(self, name: str):
        _u, s = self.ctx.pair(name)
        Qa, Ra = torch.linalg.qr(s.A.double().T)  # A_S^T = Q R, so B_S A_S = (B_S R^T) Q^T
        Bv = s.B.double() @ Ra.T
        U, sv, _ = torch.linalg.svd(Bv, full_matrices=False)
        k_num = int((sv > (sv[0] * 1e-6 if sv.numel() and sv[0] > 0 else float("inf"))).sum())
        k = k_num if self.k is None else min(int(self.k), k_num)
        if k == 0:
            raise InputError(f"{self.method}: the safety update of layer {name} is zero, so it gives no alignment direction")
        return U[:, :k], {"align_rank": k, "align_source": "safety_adapter"}, None

    def _pair_basis(self, name: str):
        u, s = self.ctx.pair(name)
        aligned, unaligned = self.pair
        key = f"{name}.weight"
        Wa, Wu = aligned.get(key).double(), unaligned.get(key).double()
        if Wa.shape != Wu.shape or tuple(Wa.shape) != u.shape:
            raise InputError(f"{self.method}: layer {name} is {tuple(Wa.shape)} in the aligned model and {tuple(Wu.shape)} "
                             f"in its base, the adapters expect {u.shape}; use models of the adapters' architecture")
        V = Wa - Wu
        k = int(self.k) if self.k is not None else max(s.rank, 1)
        U, sv = top_left(V, k, self.ctx.layer_seed(name))
        if not sv.numel() or not sv[0] > 0:
            raise InputError(f"{self.method}: the aligned and base models are identical in layer {name}; no alignment direction")
        k = min(k, int((sv > sv[0] * 1e-6).sum()))
        info = {"align_rank": k, "align_source": "model_pair"}
        T = None
        if not self.served_is_aligned:
            Wb = Wu if unaligned.path.resolve() == self.base_files.path.resolve() else self.base_files.get(key).double()
            T, info["served_offset_rank"] = self._offset(name, Wa, Wb)
        return U[:, :k].contiguous(), info, T

    def _offset(self, name: str, Wa: torch.Tensor, Wb: torch.Tensor):
        """Exact low-rank factors of ``Wa - Wb``. Both are stored fp32, so their difference carries
        round-off of at most ``u (||Wa||_F + ||Wb||_F)`` in spectral norm: singular values below that
        are round-off, the rest is the update."""
        D = Wa - Wb
        U, sv, Vh = torch.linalg.svd(D, full_matrices=False)
        tol = _U32 * (float(torch.linalg.matrix_norm(Wa)) + float(torch.linalg.matrix_norm(Wb)))
        k = int((sv > tol).sum())
        O, I = D.shape
        if k * (O + I) > O * I:  # the factors would outweigh the dense layer: not base + a low-rank update
            raise InputError(f"{self.method}: the aligned model differs from the base model at rank {k} in layer {name} "
                             "(not a low-rank update of it); serve the aligned model itself: pass it as the base "
                             "model, with adapters trained on it, as in the paper")
        return ((U[:, :k] * sv[:k]).float().contiguous(), Vh[:k].float().contiguous()), k


def top_left(V: torch.Tensor, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """V's left singular vectors and values: all of them by a full SVD, or the top k + 10 by a seeded
    randomized SVD (4 power iterations) when min(O, I) > 2048 (a 7-14B model's layers)."""
    if min(V.shape) > 2048:
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        U, sv, _ = torch.svd_lowrank(V, q=min(k + 10, min(V.shape)), niter=4)
        torch.random.set_rng_state(gen_state)
        return U, sv
    U, sv, _ = torch.linalg.svd(V, full_matrices=False)
    return U, sv


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


def projected(ctx: Context, al: Alignment, alphas, threshold: float, desc: str, extra):
    """Each alpha's factors ``[s_U B_U - alpha [sel](I - P) s_U B_U] A_U + extra(name, alpha)`` and the
    per-layer diagnostics: the shared body of Safe LoRA's variants (``extra``: [(weight, B, A)] terms)."""
    out = [({}, {}) for _ in alphas]
    for name in ctx.iterate(desc):
        u, _s = ctx.pair(name)
        U_V, info = al.basis(name)
        cos = cosine(u, U_V)
        sel = cos < threshold
        BU = u.scale * u.B.double()
        off = BU - U_V @ (U_V.T @ BU) if sel else None
        for (layers, diags), a in zip(out, alphas):
            Ba = (BU - a * off) if sel else BU
            layers[name] = stack([(1.0, Ba.float(), u.A), *extra(name, a)])
            diags[name] = {**info, "cosine": cos, "projected": bool(sel), "rank": layers[name].rank}
    return [(layers, {"projected_layers": sum(d["projected"] for d in diags.values()), "layers": diags})
            for layers, diags in out]


def sweep(ctx: Context, alphas, *, threshold: float = 0.5, align_rank=None, align_model=None, align_base=None):
    if align_model is None:
        raise InputError("safe_lora projects onto the difference of an aligned and an unaligned model: pass align_model "
                         "(exp1/tune/merge --align-model; the worlds ship one), or use safe_lora_adapter, which takes "
                         "the alignment direction from the safety adapter")
    al = Alignment(ctx, align_rank, align_model, align_base, method="safe_lora", serve_aligned=True)

    def served(name, a):
        T = al.served_offset(name)
        return [] if T is None else [(a, T[0], T[1])]

    return projected(ctx, al, alphas, threshold, "safe_lora", served)


METHOD = Method("safe_lora", from_sweep(sweep), DEFAULTS, no_fisher, doc=__doc__, sweep=sweep)
