"""The common core of every merge method.

Every method maps, layer by layer, the utility update ``dU = s_U B_U A_U`` and the safety update
``dS = s_S B_S A_S`` (plus whatever Fisher statistics it needs) to merged *factors*

    dM = scale * B_M @ A_M        (B_M [O, k], A_M [k, I], k may differ per layer)

Both outputs are derived from these factors — the peft adapter (:func:`sstmerge.adapters.save_adapter`)
and the fused weights (:mod:`sstmerge.merge.writers`) — so they agree by construction.

Methods whose rule is entry-wise (TIES, DARE, diagonal Fisher averaging) build the dense [O, I]
delta of one layer at a time and factor it at a bounded rank (:mod:`sstmerge.merge.dense`; the
exact :func:`factor_dense` only when asked).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import zlib
from typing import Callable, Mapping

import torch
from torch import Tensor

from ..adapters import LoraAdapter, LoraLayer, orth
from ..errors import InputError


@dataclasses.dataclass
class LayerFactors:
    """A merged layer update ``scale * B @ A`` (fp32, CPU)."""

    B: Tensor
    A: Tensor
    scale: float = 1.0

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    def delta(self) -> Tensor:
        return self.scale * (self.B.double() @ self.A.double())


@dataclasses.dataclass
class Context:
    """What a method sees: the adapters, the Fisher statistics, options common to all methods."""

    base: str
    utility: LoraAdapter
    safety: LoraAdapter
    fisher: object | None  # FisherInputs (see fisher_inputs) or None
    seed: int = 0
    progress: bool = False

    @property
    def layers(self) -> list[str]:
        return sorted(self.utility.layers)

    def pair(self, name: str) -> tuple[LoraLayer, LoraLayer]:
        return self.utility.layers[name], self.safety.layers[name]

    def layer_seed(self, name: str) -> int:
        """A per-layer seed that does not depend on iteration order."""
        return (self.seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1)

    def iterate(self, desc: str):
        names = self.layers
        if self.progress:
            from tqdm.auto import tqdm

            return tqdm(names, desc=desc, unit="layer", leave=False)
        return names


def stack(parts: list[tuple[float, Tensor, Tensor]]) -> LayerFactors:
    """``sum_i w_i B_i A_i`` as one factor pair ``[w_1 B_1, w_2 B_2, ...] @ [A_1; A_2; ...]``.

    This is exact: no cross terms (unlike merging A's and B's separately). Terms with weight 0 are
    left out, so e.g. alpha = 0 gives back the utility factors alone."""
    kept = [(w, B, A) for w, B, A in parts if w != 0.0 and B.shape[1] > 0]
    if not kept:
        B0, A0 = parts[0][1], parts[0][2]
        return LayerFactors(B0.new_zeros(B0.shape[0], 0), A0.new_zeros(0, A0.shape[1]))
    B = torch.cat([float(w) * B.float() for w, B, _ in kept], dim=1)
    A = torch.cat([A.float() for _, _, A in kept], dim=0)
    return LayerFactors(B.contiguous(), A.contiguous())


#: Singular values at or below ``s_max * max(O, I) * eps(fp32)`` are round-off (numpy's matrix_rank
#: rule); :func:`factor_dense` drops them when no rank is asked for.
def rank_tolerance(s: Tensor, shape: tuple[int, int]) -> float:
    if s.numel() == 0:
        return 0.0
    return float(s[0]) * max(shape) * torch.finfo(torch.float32).eps


def factor_dense(delta: Tensor, rank: int | None = None) -> tuple[LayerFactors, dict]:
    """Factor a dense delta [O, I] as ``B @ A`` by SVD: ``B = U_k diag(s_k)``, ``A = V_k^T``.

    ``rank=None`` keeps every singular value above round-off (:func:`rank_tolerance`), so the
    factors reproduce ``delta`` to fp32 round-off; ``rank=k`` keeps the top k and the residual
    ``||delta - B A||_F / ||delta||_F`` (= sqrt(sum of dropped s^2) / ||s||) is reported."""
    d = delta.float()
    U, s, Vh = torch.linalg.svd(d, full_matrices=False)
    tol = rank_tolerance(s, tuple(d.shape))
    numerical = int((s > tol).sum())
    k = numerical if rank is None else min(int(rank), numerical)
    total = float(s.double().pow(2).sum())
    dropped = float(s[k:].double().pow(2).sum())
    B = (U[:, :k] * s[:k]).contiguous()
    A = Vh[:k].contiguous()
    info = {"rank": k, "numerical_rank": numerical,
            "residual_rel": math.sqrt(dropped / total) if total > 0 else 0.0}
    return LayerFactors(B, A), info


def factor_small(Q_out: Tensor, M: Tensor, Q_in: Tensor, rank: int | None = None) -> tuple[LayerFactors, dict]:
    """Factors of ``Q_out M Q_in^T`` (M [m_o, m_i] small, Q orthonormal): SVD of M,
    ``B = Q_out U_k diag(s_k)``, ``A = V_k^T Q_in^T``; rank as in :func:`factor_dense` ("auto" and
    "full" mean every numerical singular value: the rank is at most min(m_o, m_i) <= r_U + r_S)."""
    if rank in ("auto", "full"):
        rank = None
    M64 = M.double()
    if M64.numel() == 0:
        return LayerFactors(Q_out.new_zeros(Q_out.shape[0], 0), Q_in.new_zeros(0, Q_in.shape[0])), \
            {"rank": 0, "numerical_rank": 0, "residual_rel": 0.0}
    U, s, Vh = torch.linalg.svd(M64, full_matrices=False)
    tol = float(s[0]) * max(M64.shape) * 1e-12 if s.numel() else 0.0
    numerical = int((s > tol).sum())
    k = numerical if rank is None else min(int(rank), numerical)
    total = float(s.pow(2).sum())
    dropped = float(s[k:].pow(2).sum())
    B = (Q_out.double() @ (U[:, :k] * s[:k])).float().contiguous()
    A = (Vh[:k] @ Q_in.double().T).float().contiguous()
    return LayerFactors(B, A), {"rank": k, "numerical_rank": numerical,
                                "residual_rel": math.sqrt(dropped / total) if total > 0 else 0.0}


def in_subspace(layer: LoraLayer, q_in: Tensor, q_out: Tensor) -> Tensor:
    """``q_out^T (s B A) q_in`` [m_o, m_i] in fp64, computed through the factors."""
    return layer.scale * ((q_out.double().T @ layer.B.double()) @ (layer.A.double() @ q_in.double()))


def check_finite(name: str, f: LayerFactors, method: str) -> None:
    if not (torch.isfinite(f.B).all() and torch.isfinite(f.A).all()):
        raise InputError(f"{method}: layer {name} produced NaN/Inf factors (check the Fisher statistics and "
                         "options); no output was written")


def options_key(d: Mapping) -> str:
    return hashlib.sha256(repr(sorted(d.items())).encode()).hexdigest()[:16]


@dataclasses.dataclass
class Method:
    """A registered method: ``run(ctx, alpha, **options) -> (factors, diagnostics)``; methods with
    alpha-independent work per layer (a Fisher pencil, a dense target) also give
    ``sweep(ctx, alphas, **options) -> [(factors, diagnostics) per alpha]``, which does that work
    once for all alphas and returns what ``run`` returns at each of them."""

    name: str
    run: Callable
    defaults: dict
    fisher: Callable[[dict], list[tuple[str, str]]]  # options -> [(role, kind)] it needs
    equal_ranks: bool = False
    doc: str = ""
    sweep: Callable | None = None

    def run_sweep(self, ctx: "Context", alphas, **options) -> list[tuple[dict, dict]]:
        if self.sweep is not None:
            return self.sweep(ctx, list(alphas), **options)
        return [self.run(ctx, a, **options) for a in alphas]


def from_sweep(sweep: Callable) -> Callable:
    """``run(ctx, alpha, **options)`` of a method defined by its sweep."""
    def run(ctx: "Context", alpha: float, **options):
        return sweep(ctx, [alpha], **options)[0]
    return run


def no_fisher(_opts: dict) -> list[tuple[str, str]]:
    return []


def orth_cols(m: Tensor) -> Tensor:
    return orth(m)
