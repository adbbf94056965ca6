"""Shared driver of the dense-delta methods (TIES, DARE, diagonal Fisher averaging).

For each layer, one at a time, the method's entry-wise rule is applied to blocks of rows of ``dU``
and ``dS`` (built from the factors block by block) and written into one [O, I] fp32 buffer ``D``
— the only [O, I]-sized array of the merge; the blocks are bounded by ROW_BLOCK_ENTRIES. Global
statistics a rule needs (TIES' magnitude cut, fisher_avg's mean Fisher) are computed first in a
streaming pass (:func:`kth_largest_abs`: exact, by a histogram of fp32 bit patterns).

Every method is run over a sweep of strengths alpha at once (:func:`run_dense`): the layer's global
statistics are computed once for all alphas, and for the methods whose merge moves linearly from dU
to an alpha-independent target M (TIES, DARE: ``D(α) = dU + α (M - dU)``) the dense M is built and
its range found once per layer (:func:`toward_factors`); fisher_avg's rule is not linear in alpha,
and its sweep shares one range instead (:func:`rule_factors`): D(REF_ALPHA) is built once and its
range found, and one more pass over the row blocks projects every D(α) onto it while the rows are
in cache (the α-independent parts of a block — dU, dS, the Fishers' rows — computed once).

The dense result is factored (``rank``):
  * ``"auto"`` (default): rank ``k = r_U + r_S`` by a randomized SVD (range finder with
    ``p = OVERSAMPLE`` extra columns and POWER_ITERS power iterations, REF_POWER_ITERS for a
    rule's reference range; on the weights' device):
    ``Q = orth(D Ω)``, ``Q^T D = U s V^T``, ``B = Q U_k diag(s_k)``, ``A = V_k^T``. ``B A`` is the
    orthogonal projection of D onto span(Q U_k), so the reported residual
    ``||D - B A||_F / ||D||_F = sqrt(||D||_F^2 - sum s_k^2) / ||D||_F`` is exact. For
    ``D(α) = (1 - α) dU + α M`` the range is ``Q = orth[B_U, Q_M]`` with ``Q_M`` the range of M:
    it holds dU exactly (α = 0 gives dU to round-off), and ``Q^T D(α) = (1-α) (Q^T B_U) A_U + α Q^T M``
    costs one pass over M for all alphas; ``||D(α)||² = ||Q^T D(α)||² + α² (||M||² - ||Q^T M||²)``.
    For a rule not linear in α the range is ``Q = orth[B_U, B_S, Q_ref]`` with ``Q_ref`` the range of
    D(REF_ALPHA): exact at α = 0 (dU) and where the rule returns dS, within 1 % of the Eckart-Young
    optimum for fisher_avg at α in [1/4, 4] on a layer with Kronecker-like log-normal Fishers
    (a range per alpha would cost 4 passes over D(α) instead of one);
  * an int ``k``: the same with that rank;
  * ``"full"`` (or None): every singular value above round-off by a full SVD
    (:func:`sstmerge.merge.core.factor_dense`) of each D(α); the adapter can then be ~min(O, I) wide.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from ..errors import InputError
from .core import Context, LayerFactors, factor_dense

#: Entries per row block of the entry-wise rules (1 MB in fp32 per block array: the ~10 arrays of
#: a rule stay in cache; measured 2.5x faster than 16 MB blocks for TIES on a 2048 x 4096 layer).
ROW_BLOCK_ENTRIES = 1 << 18
OVERSAMPLE = 10
#: power iterations of the range finder: 2 for TIES' and DARE's range of M; 1 for a rule's reference
#: range, which B_U and B_S join (fisher_avg on a 1024 x 2048 layer with Kronecker-like Fishers, α in
#: [1/4, 4]: a range per α without power iterations gave 1.54x the Eckart-Young error, this shared one
#: <= 1.009x; tests/test_merge.py bounds it at 1.05x; the exact residual is reported)
POWER_ITERS = 2
REF_POWER_ITERS = 1
#: the alpha whose range a rule's sweep shares (:func:`rule_factors`): fixed, so a sweep equals its
#: single-alpha runs
REF_ALPHA = 1.0


def rank_option(rank) -> int | str:
    """Validated ``rank``: "auto", "full" (None is "full"), or a positive int."""
    if rank is None or rank == "full":
        return "full"
    if rank == "auto":
        return "auto"
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise InputError(f"rank must be 'auto', 'full' or a positive int, got {rank!r}")
    return rank


def compute_device() -> torch.device:
    """The weights' device for the dense work: the GPU when there is one (adapters load on the CPU)."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def row_blocks(O: int, I: int):
    step = max(1, ROW_BLOCK_ENTRIES // max(I, 1))
    for r0 in range(0, O, step):
        yield r0, min(O, r0 + step)


class Deltas:
    """Row blocks of ``dU = s_U B_U A_U`` and ``dS`` (fp32, on ``device``), never the whole [O, I]."""

    def __init__(self, u, s, device):
        self.uB, self.uA = (u.scale * u.B.double()).float().to(device), u.A.float().to(device)
        self.sB, self.sA = (s.scale * s.B.double()).float().to(device), s.A.float().to(device)
        self.shape = u.shape

    def u(self, r0, r1) -> Tensor:
        return self.uB[r0:r1] @ self.uA

    def s(self, r0, r1) -> Tensor:
        return self.sB[r0:r1] @ self.sA


def kth_largest_abs(block: Callable[[int, int], Tensor], O: int, I: int, k: int) -> float:
    """The k-th largest |entry| (1-based) of the [O, I] matrix given by row blocks, exactly.

    Non-negative fp32 values order like their int32 bit patterns: pass 1 counts the top 16 bits of
    every |entry| (32768 bins), which fixes the bin holding the k-th largest; pass 2 collects that
    bin's entries and selects inside it. Memory: one row block plus the bin's entries."""
    if not 1 <= k <= O * I:
        raise ValueError(f"k={k} outside [1, {O * I}]")
    counts = None
    for r0, r1 in row_blocks(O, I):
        hi = block(r0, r1).abs().float().contiguous().view(torch.int32) >> 16
        c = torch.bincount(hi.flatten(), minlength=1 << 15)
        counts = c if counts is None else counts + c
    from_top = counts.flip(0).cumsum(0)
    j = int((from_top >= k).nonzero()[0, 0])
    b = (1 << 15) - 1 - j
    above = int(from_top[j - 1]) if j > 0 else 0  # entries in higher bins
    vals = []
    for r0, r1 in row_blocks(O, I):
        a = block(r0, r1).abs().float().contiguous()
        vals.append(a[(a.view(torch.int32) >> 16) == b])
    v = torch.cat(vals)
    return float(torch.sort(v, descending=True).values[k - above - 1])


def range_finder(D: Tensor, ell: int, gen: torch.Generator, power_iters: int = POWER_ITERS) -> Tensor:
    """An orthonormal [O, ell] basis approximating the dominant column space of D (Halko et al. 2011,
    alg. 4.4: Gaussian test matrix, ``power_iters`` re-orthonormalised subspace iterations)."""
    omega = torch.randn(D.shape[1], ell, generator=gen, dtype=torch.float32).to(D.device)
    Q = torch.linalg.qr(D @ omega).Q
    for _ in range(power_iters):
        Q = torch.linalg.qr(D @ torch.linalg.qr(D.T @ Q).Q).Q
    return Q


def _factors_from(Q: Tensor, C: Tensor, total: float, k: int) -> tuple[LayerFactors, dict]:
    """Rank-k factors of the projection ``Q C`` (C = Q^T D, fp64) of a D with ``||D||² = total``."""
    U, s, Vh = torch.linalg.svd(C, full_matrices=False)
    k = min(k, int((s > 0).sum()))
    B = (Q.double() @ (U[:, :k] * s[:k])).float()
    A = Vh[:k].float()
    kept = float(s[:k].pow(2).sum())
    residual = math.sqrt(max(total - kept, 0.0) / total) if total > 0 else 0.0
    return LayerFactors(B.contiguous().cpu(), A.contiguous().cpu()), {"rank": k, "residual_rel": residual}


def _zero(O: int, I: int) -> tuple[LayerFactors, dict]:
    return LayerFactors(torch.zeros(O, 0), torch.zeros(0, I)), {"rank": 0, "residual_rel": 0.0}


def toward_factors(dl: "Deltas", M: Tensor, alphas, k: int, gen: torch.Generator,
                   normM2: float | None = None) -> list[tuple[LayerFactors, dict]]:
    """Rank-k factors of ``D(α) = (1 - α) dU + α M`` for every alpha from one range of M (module
    docstring): one range finder and one projection pass over M, then an [m, I] SVD per alpha."""
    O, I = M.shape
    if normM2 is None:
        normM2 = _sumsq(M)
    Qm = range_finder(M, min(k + OVERSAMPLE, O, I), gen) if normM2 > 0 else M.new_zeros(O, 0)
    Q = torch.linalg.qr(torch.cat([dl.uB, Qm], dim=1)).Q               # [O, m], holds span(B_U) exactly
    PU = (Q.T @ dl.uB).double() @ dl.uA.double()                        # Q^T dU   [m, I]
    PM = (M.T @ Q).T.double()                                           # Q^T M    [m, I]
    outside = max(normM2 - float(PM.pow(2).sum()), 0.0)                 # ||(1 - Q Q^T) M||²
    out = []
    for a in alphas:
        C = (1.0 - a) * PU + a * PM
        total = float(C.pow(2).sum()) + a * a * outside
        out.append(_factors_from(Q, C, total, k) if total > 0 else _zero(O, I))
    return out


def rule_factors(dl: "Deltas", rule: Callable, alphas, k: int, gen: torch.Generator,
                 D: Tensor) -> list[tuple[LayerFactors, dict]]:
    """Rank-k factors of ``D(α)`` for every alpha from one shared range (module docstring), for a
    ``rule(alphas, r0, r1, dU_rows, dS_rows) -> [(D_rows, info) per alpha]``; ``D`` is the layer's
    [O, I] buffer (it holds D(REF_ALPHA) while its range is found)."""
    O, I = D.shape
    _, ref_total = _blocks_into(D, dl, lambda r0, r1, du, ds: rule([REF_ALPHA], r0, r1, du, ds)[0])
    Qr = range_finder(D, min(k + OVERSAMPLE, O, I), gen, REF_POWER_ITERS) if ref_total > 0 else D.new_zeros(O, 0)
    Q = torch.linalg.qr(torch.cat([dl.uB, dl.sB, Qr], dim=1)).Q          # [O, m]
    Ct = [torch.zeros(I, Q.shape[1], dtype=torch.float32, device=D.device) for _ in alphas]  # D(α)^T Q
    totals = [0.0] * len(alphas)
    infos: list[dict] = [{} for _ in alphas]
    for r0, r1 in row_blocks(O, I):
        for j, (rows, part) in enumerate(rule(alphas, r0, r1, dl.u(r0, r1), dl.s(r0, r1))):
            Ct[j].addmm_(rows.T, Q[r0:r1])  # summed in fp32 over the blocks, as one GEMM D^T Q would
            totals[j] += _sumsq(rows)
            _add_info(infos[j], part)
    out = []
    for Cj, total, info in zip(Ct, totals, infos):
        f, fi = _factors_from(Q, Cj.T.double(), total, k) if total > 0 else _zero(O, I)
        out.append((f, {**_mean_info(info, O * I), **fi}))
    return out


def _sumsq(X: Tensor) -> float:
    """||X||_F^2: fp32 norms of rows (each <= I entries, pairwise-summed), added in fp64 — as
    accurate as the fp32 products Q^T D it is compared with, and ~20x faster than an fp64 copy."""
    return float(torch.linalg.vector_norm(X, dim=-1).double().pow(2).sum()) if X.numel() else 0.0


def _blocks_into(D: Tensor, dl: "Deltas", fn: Callable) -> tuple[dict, float]:
    """Fill D by row blocks: ``fn(r0, r1, dU_rows, dS_rows) -> (rows, info)``; returns the summed
    info and ||D||_F^2 (summed while each block is in cache)."""
    O, I = D.shape
    info: dict = {}
    total = 0.0
    for r0, r1 in row_blocks(O, I):
        rows, part = fn(r0, r1, dl.u(r0, r1), dl.s(r0, r1))
        D[r0:r1] = rows
        total += _sumsq(rows)
        _add_info(info, part)
    return _mean_info(info, O * I), total


def _add_info(acc: dict, part: dict) -> None:
    """Add one row block's diagnostics into the layer's sums."""
    for key, v in part.items():
        acc[key] = acc.get(key, 0.0) + v


def _mean_info(info: dict, n: int) -> dict:
    """The layer's diagnostics: sums, except ``mean_*`` keys, divided by the n = O I entries."""
    return {key: (v / n if key.startswith("mean_") else v) for key, v in info.items()}


def run_dense(ctx: Context, desc: str, alphas, rank, *, prepare: Callable | None = None,
              target: Callable | None = None, rule: Callable | None = None) -> list[tuple[dict, dict]]:
    """The layers and diagnostics of a dense-delta method at each alpha (in order), one layer at a time.

    ``prepare(name, deltas) -> stats``: the layer's global statistics, once for all alphas. Then either
    ``target(name, r0, r1, dU_rows, dS_rows, stats) -> (M_rows, info)`` — the alpha-independent merge
    M, with ``D(α) = dU + α (M - dU)`` — or ``rule(name, alphas, r0, r1, dU_rows, dS_rows, stats) ->
    [(D_rows, info) per alpha]``, the merged rows at each alpha (the block's alpha-independent work
    done once). ``info``: sums added over the blocks (keys ``mean_*`` are divided by O I)."""
    if (target is None) == (rule is None):
        raise TypeError("run_dense: give exactly one of target= and rule=")
    rank = rank_option(rank)
    alphas = [float(a) for a in alphas]
    device = compute_device()
    layers = [dict() for _ in alphas]
    diags = [dict() for _ in alphas]
    for name in ctx.iterate(desc):
        u, s = ctx.pair(name)
        dl = Deltas(u, s, device)
        O, I = dl.shape
        stats = prepare(name, dl) if prepare is not None else None
        k = u.rank + s.rank if rank == "auto" else rank
        rank_rule = {"rank_rule": "r_U + r_S" if rank == "auto" else "given"} if rank != "full" else {}
        D = torch.empty(O, I, dtype=torch.float32, device=device)  # the one [O, I] buffer of the layer
        if target is not None:
            info, normM2 = _blocks_into(D, dl, lambda r0, r1, du, ds: target(name, r0, r1, du, ds, stats))
            if rank == "full":
                for j, a in enumerate(alphas):  # D(α) row block by row block, into a second buffer
                    Da = torch.empty_like(D)
                    _blocks_into(Da, dl, lambda r0, r1, du, ds, M=D: (du + a * (M[r0:r1] - du), {}))
                    layers[j][name], fi = factor_dense(Da.cpu())
                    diags[j][name] = {**info, **fi}
                    del Da
            else:
                gen = torch.Generator().manual_seed(ctx.layer_seed(name))
                for j, (f, fi) in enumerate(toward_factors(dl, D, alphas, k, gen, normM2)):
                    layers[j][name], diags[j][name] = f, {**info, **fi, **rank_rule}
        elif rank == "full":
            for j, a in enumerate(alphas):
                info, _ = _blocks_into(D, dl, lambda r0, r1, du, ds: rule(name, [a], r0, r1, du, ds, stats)[0])
                layers[j][name], fi = factor_dense(D.cpu())
                diags[j][name] = {**info, **fi}
        else:
            gen = torch.Generator().manual_seed(ctx.layer_seed(name))
            at = lambda al, r0, r1, du, ds: rule(name, al, r0, r1, du, ds, stats)  # noqa: E731
            for j, (f, fi) in enumerate(rule_factors(dl, at, alphas, k, gen, D)):
                layers[j][name], diags[j][name] = f, {**fi, **rank_rule}
        del D
    return [(L, {"layers": d, "rank": rank,
                 "residual_rel_max": max((x["residual_rel"] for x in d.values()), default=0.0)})
            for L, d in zip(layers, diags)]


def trim_top(t: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``density`` fraction of entries of largest magnitude (ties at the cut kept), zero the rest."""
    if density >= 1.0:
        return t.clone()
    k = int(round(density * t.numel()))
    if k <= 0:
        return torch.zeros_like(t)
    thresh = t.abs().flatten().kthvalue(t.numel() - k + 1).values
    return torch.where(t.abs() >= thresh, t, torch.zeros_like(t))


def elect_and_merge(taus: list[torch.Tensor]) -> torch.Tensor:
    """TIES' sign election and disjoint mean: the elected sign of an entry is the sign of the sum of
    the (trimmed) task vectors; the merged entry is the mean of the entries that agree with it
    (zero entries do not count)."""
    if len(taus) == 2:  # the same rule in closed form for two vectors (4x fewer passes)
        a, b = taus
        total = a + b
        # otherwise the sum's sign is the larger one's: that one alone (a tie of opposites sums to 0)
        pick = torch.where(a.abs() >= b.abs(), a, b).mul_(total != 0)
        return torch.where(a * b > 0, total.mul_(0.5), pick)  # both nonzero, one sign: their mean
    total = sum(taus)
    sign = torch.sign(total)
    num = torch.zeros_like(total)
    cnt = torch.zeros_like(total)
    for t in taus:
        agree = (torch.sign(t) == sign) & (t != 0)
        num += torch.where(agree, t, torch.zeros_like(t))
        cnt += agree.to(t.dtype)
    return num / cnt.clamp_min(1.0)
