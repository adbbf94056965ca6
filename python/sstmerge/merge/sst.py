"""SST-Merge: Fisher-guided merge of the safety update into the utility update, inside the joint
LoRA subspace (DESIGN.md §5; the rule and defaults are documented and justified in docs/merge.md).

Per target layer:

1. Joint subspace ``(Q_in, Q_out) = (orth[A_U^T, A_S^T], orth[B_U, B_S])`` (rank-revealing); both
   updates live in it exactly: ``M_X = Q_out^T dX Q_in`` [m_o, m_i], ``dX = Q_out M_X Q_in^T``.
   A direction is ``c = vec(M)`` (row-major, n = m_o m_i entries).
2. Fisher of each objective in the subspace (``curvature``):
   * ``"exact"``: F_X [n, n] from a ``subspace`` Fisher;
   * ``"kfac"``:  F_X ≈ G_X ⊗ A_X (projected Kronecker factors of a ``kfac`` Fisher);
   * ``"input"``: F_X ≈ I ⊗ A_X (the input-side factor only: activation statistics);
   * ``"diag"`` (default): F_X = K^T diag(vec F_X^diag) K, K = Q_out ⊗ Q_in — the diagonal Fisher
     of the layer's full [O, I] weight restricted to the joint subspace (a ``diag_sub`` Fisher,
     accumulated restricted batch by batch; or an exact ``diag`` one restricted here), a dense
     [n, n] matrix there (the diagonal-Fisher signal, the one ``fisher_avg`` uses, but resolved
     direction by direction inside the subspace; measured best on the tiny world, docs/merge.md).
   ``fisher_at``: where both Fishers are taken: ``"base"`` (the base model alone), ``"own"`` (each
   role at its own adapter's model), ``"merged"`` (base + dU + dS)
   (:mod:`sstmerge.merge.fisher_inputs`); only ``"own"`` for the exact/kfac/input curvatures (taken
   in the LoRA parameters). The default (None) is ``"base"`` for ``diag`` and ``"own"`` for the others
   (:func:`fisher_point`). ``base`` is the diag default because it scored best on the dev splits of
   both worlds (docs/merge.md, "Tuned on dev, reported on test"): at its own model the safety
   Fisher is small exactly where the safety adapter moved the weights (λ < 1 everywhere on the tiny
   world).
   The utility side is damped: ``F_U + gamma_abs I`` (exact, diag) or ``(G_U + g_G I) ⊗ (A_U + g_A I)``
   (kfac / input; no G damping for input), with each ``gamma_abs = gamma * tr(F)/dim`` of the utility
   factor (of the safety one if the utility's is zero; both zero is an error).
3. Generalized eigenbasis V of the pencil (F_S, F_U'): ``V^T F_U' V = I``, ``V^T F_S V = diag(λ)``.
   λ_j is how much more the safety objective depends on direction j than the utility objective.
   For Kronecker curvature V = V_G ⊗ V_A and λ_{jk} = λ_G,j λ_A,k (pencils of the small factors).
   Coordinates: ``y_X = V^-1 c_X = V^T F_U' c_X``.
4. Rule (``rule``), per direction, with safety weight w_j ∈ [0, 1] and ``y_j = (1-w_j) y_U,j + w_j y_S,j``:
   * ``"soft"``: ``w = αλ / (1 + αλ)`` — the exact minimiser of
     ``(c - c_U)^T F_U' (c - c_U) + α (c - c_S)^T F_S (c - c_S)`` (the conflict resolved by the
     Fisher ratio everywhere);
   * ``"hard"``: ``w = 1`` where safety dominates (``αλ >= threshold``), ``w = 0`` where utility
     dominates (``αλ <= 1/threshold``), the soft weight in between (contested directions);
   * ``"topk"``: ``w = min(α, 1)`` on the ``topk`` directions of largest λ, 0 elsewhere.
   * ``"additive"``: keep dU whole and add α times the safety update's components along the
     ``topk`` directions of largest λ (where safety cares most relative to utility):
     ``y = y_U + α 1[j ∈ top-k] y_S`` — not a convex combination; ``topk = n`` gives
     ``dU + α dS`` (task arithmetic), ``topk = 0`` gives dU.
   α is the weight of the safety objective; α = 0 gives w = 0 everywhere, i.e. dU (to round-off).
5. ``M* = V y``; the merged update ``Q_out M* Q_in^T`` is written exactly as factors of rank
   ``rank(M*) <= m_i`` (``rank=k`` truncates M* by SVD and reports the residual).

Diagnostics per layer: subspace dims, the λ spectrum, how many directions each side dominates,
conflicts (directions where both updates have a component: |y_U,j| and |y_S,j| above ``1e-6`` of
their largest) and how each was resolved (safety / utility / ratio, mean safety weight), kept rank,
and the Fisher mass kept: ``1 - ||y - y_S||²_F_S / ||y_S||²_F_S`` for safety and
``1 - ||y - y_U||²_F_U' / ||y_U||²_F_U'`` for utility (1 = the update kept whole under its own
objective's metric). Any failure in any layer raises; there is no fallback.
"""

from __future__ import annotations

import torch

from ..adapters import joint_layer
from ..errors import InputError
from .core import Context, Method, factor_small, from_sweep, in_subspace
from ..fisher.restrict import restrict_diag
from .fisher_inputs import at_kind, diag_restricted, kfac_block, subspace_block

RULES = ("soft", "hard", "topk", "additive")
CURVATURES = ("exact", "kfac", "input", "diag")
DEFAULTS = {"rule": "soft", "curvature": "diag", "gamma": 1e-4, "threshold": 4.0, "topk": None, "rank": None,
            "fisher_at": None}
#: Components below this fraction of an update's largest eigen-coordinate count as absent.
PRESENT_RTOL = 1e-6
SPECTRUM_LEN = 32
#: A safety Fisher (accumulated in fp32) counts as PSD when its smallest eigenvalue is >= -PSD_RTOL * largest.
PSD_RTOL = 1e-5


def _kind(curvature: str) -> str:
    return {"exact": "subspace", "diag": "diag_sub"}.get(curvature, "kfac")


def fisher_point(curvature: str, fisher_at: str | None) -> str:
    """The model point the Fisher is taken at: ``fisher_at``, or by default ``"base"`` for the diag
    curvature and ``"own"`` for the others (module docstring)."""
    if fisher_at is None:
        return "base" if curvature == "diag" else "own"
    return fisher_at


def _fisher(opts):
    curvature = opts.get("curvature", DEFAULTS["curvature"])
    at = fisher_point(curvature, opts.get("fisher_at", DEFAULTS["fisher_at"]))
    if at != "own" and curvature != "diag":
        raise InputError(f"sst: fisher_at={at!r} needs curvature='diag' (the other curvatures are taken in the "
                         "adapters' LoRA parameters, at their own model)")
    kind = at_kind(_kind(curvature), at)
    return [("utility", kind), ("safety", kind)]


def diag_in_subspace(F: torch.Tensor, q_in: torch.Tensor, q_out: torch.Tensor) -> torch.Tensor:
    """The diagonal Fisher F [O, I] of the layer's weight restricted to the joint subspace:
    ``K^T diag(vec F) K`` with ``K = q_out ⊗ q_in`` (row-major vec of M), [m_o m_i, m_o m_i]
    (:func:`sstmerge.fisher.restrict.restrict_diag`: row blocks of F, no I x m x O temporary)."""
    Fs = restrict_diag(F, q_in, q_out)
    return 0.5 * (Fs + Fs.T)


def _damping(FU: torch.Tensor, FS: torch.Tensor, gamma: float, name: str, what: str) -> float:
    d = FU.shape[0]
    if d == 0:
        return 0.0
    ref = float(torch.trace(FU)) / d
    if not ref > 0:
        ref = float(torch.trace(FS)) / d
    if not ref > 0:
        raise InputError(f"sst: the {what} Fisher of both objectives is zero in layer {name}; no gradient reached it "
                         "(check the Fisher data); SST-Merge stops here")
    return gamma * ref


def gen_eig(FS: torch.Tensor, FUd: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(λ ascending, V) with ``V^T FUd V = I``, ``V^T FS V = diag(λ)``, λ >= 0 (round-off clamped)."""
    try:
        L = torch.linalg.cholesky(FUd)
    except RuntimeError as e:
        raise InputError(f"sst: the damped utility Fisher of layer {name} is not positive definite ({e}); raise gamma") from None
    if FS.numel():
        ev = torch.linalg.eigvalsh(FS)
        if float(ev[0]) < -PSD_RTOL * max(float(ev[-1]), 1e-300):
            raise InputError(f"sst: the safety Fisher of layer {name} is not positive semi-definite "
                             f"(eigenvalue {float(ev[0]):.3g}, largest {float(ev[-1]):.3g}); recompute it")
    Linv = torch.linalg.solve_triangular(L, torch.eye(L.shape[0], dtype=L.dtype), upper=False)
    C = Linv @ FS @ Linv.T
    lam, W = torch.linalg.eigh(0.5 * (C + C.T))
    # F_S is PSD (checked above) but fp32 round-off in it, amplified by cond(F_U'), can give
    # slightly negative λ: they are zero
    return lam.clamp_min(0.0), Linv.T @ W


def weights(lam: torch.Tensor, alpha: float, rule: str, threshold: float, topk: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Safety weight per direction and its branch code (0 utility, 1 safety, 2 ratio). For every rule
    but ``additive`` the merged coordinate is ``(1 - w) y_U + w y_S``; for ``additive`` it is
    ``y_U + w y_S`` with ``w = α`` on the top-k directions (:func:`combine`)."""
    al = alpha * lam
    soft = al / (1.0 + al)
    if rule == "soft":
        branch = torch.full_like(lam, 2, dtype=torch.int64)
        return soft, branch
    if rule == "hard":
        w = soft.clone()
        branch = torch.full_like(lam, 2, dtype=torch.int64)
        hi, lo = al >= threshold, al <= 1.0 / threshold
        w[hi], w[lo] = 1.0, 0.0
        branch[hi], branch[lo] = 1, 0
        return w, branch
    flat = lam.flatten()
    k = min(int(topk), flat.numel())
    w = torch.zeros_like(flat)
    branch = torch.zeros_like(flat, dtype=torch.int64)
    if k > 0 and alpha > 0:
        idx = torch.argsort(flat, descending=True)[:k]
        w[idx] = alpha if rule == "additive" else min(alpha, 1.0)
        branch[idx] = 1
    return w.reshape(lam.shape), branch.reshape(lam.shape)


def combine(yU: torch.Tensor, yS: torch.Tensor, w: torch.Tensor, rule: str) -> torch.Tensor:
    """The merged eigen-coordinates: ``y_U + w y_S`` (additive) or ``(1 - w) y_U + w y_S`` (the others)."""
    return yU + w * yS if rule == "additive" else (1 - w) * yU + w * yS


def _pencil(ctx: Context, name: str, FUr, FSr, curvature, gamma, at="own") -> dict:
    """The alpha-independent part of one layer: joint subspace, generalized eigenpairs (λ flat),
    both updates' eigen-coordinates, and ``to_M(y)`` mapping coordinates back to M [m_o, m_i]."""
    u, s = ctx.pair(name)
    q_in, q_out = joint_layer(u, s)
    m_i, m_o = q_in.shape[1], q_out.shape[1]
    MU, MS = in_subspace(u, q_in, q_out), in_subspace(s, q_in, q_out)
    diag = {"m_in": int(m_i), "m_out": int(m_o), "curvature": curvature}
    if curvature in ("exact", "diag"):
        if curvature == "exact":
            FU = subspace_block(FUr, name, q_in, q_out, "utility Fisher")
            FS = subspace_block(FSr, name, q_in, q_out, "safety Fisher")
        else:
            FU = diag_restricted(ctx.fisher, "utility", name, q_in, q_out, "sst", at)
            FS = diag_restricted(ctx.fisher, "safety", name, q_in, q_out, "sst", at)
            FU, FS = 0.5 * (FU + FU.T), 0.5 * (FS + FS.T)
        g = _damping(FU, FS, gamma, name, "subspace")
        FUd = FU + g * torch.eye(FU.shape[0], dtype=FU.dtype)
        lam, V = gen_eig(FS, FUd, name)
        yU, yS = V.T @ (FUd @ MU.reshape(-1)), V.T @ (FUd @ MS.reshape(-1))
        diag["gamma_abs"] = g

        def to_M(y):
            return (V @ y).reshape(m_o, m_i)
    else:
        AU, GU = kfac_block(FUr, name, q_in, q_out, "utility Fisher")
        AS, GS = kfac_block(FSr, name, q_in, q_out, "safety Fisher")
        gA = _damping(AU, AS, gamma, name, "input-factor")
        lamA, VA = gen_eig(AS, AU + gA * torch.eye(m_i, dtype=AU.dtype), name)
        AUd = AU + gA * torch.eye(m_i, dtype=AU.dtype)
        if curvature == "kfac":
            gG = _damping(GU, GS, gamma, name, "output-factor")
            GUd = GU + gG * torch.eye(m_o, dtype=GU.dtype)
            lamG, VG = gen_eig(GS, GUd, name)
            diag["gamma_abs"] = {"input": gA, "output": gG}
        else:
            GUd = torch.eye(m_o, dtype=AU.dtype)
            lamG, VG = torch.ones(m_o, dtype=AU.dtype), torch.eye(m_o, dtype=AU.dtype)
            diag["gamma_abs"] = {"input": gA}
        lam = torch.outer(lamG, lamA).reshape(-1)  # λ_{jk} = λ_G,j λ_A,k, row-major like vec(M)
        yU = (VG.T @ GUd @ MU @ AUd @ VA).reshape(-1)
        yS = (VG.T @ GUd @ MS @ AUd @ VA).reshape(-1)

        def to_M(y):
            return VG @ y.reshape(m_o, m_i) @ VA.T
    return {"q_in": q_in, "q_out": q_out, "lam": lam, "yU": yU, "yS": yS, "to_M": to_M, "diag": diag}


def _at(p: dict, name: str, alpha: float, rule, threshold, topk, rank):
    """One layer's factors and diagnostics at strength alpha, from its pencil."""
    lam, yU, yS = p["lam"], p["yU"], p["yS"]
    w, branch = weights(lam, alpha, rule, threshold, topk)
    y = combine(yU, yS, w, rule)
    M = p["to_M"](y)
    if not torch.isfinite(M).all():
        raise InputError(f"sst: layer {name} produced NaN/Inf (Fisher ill-conditioned); raise gamma")
    f, info = factor_small(p["q_out"], M, p["q_in"], rank)
    # --- diagnostics
    diag = {**p["diag"], "rule": rule}
    al = alpha * lam
    present_u = yU.abs() > PRESENT_RTOL * max(float(yU.abs().max()) if yU.numel() else 0.0, 1e-300)
    present_s = yS.abs() > PRESENT_RTOL * max(float(yS.abs().max()) if yS.numel() else 0.0, 1e-300)
    conflict = present_u & present_s
    names = {0: "utility", 1: "safety", 2: "ratio"}
    resolved = {names[b]: int(((branch == b) & conflict).sum()) for b in (0, 1, 2)}
    eu = float((yU ** 2).sum())
    es = float((lam * yS ** 2).sum())
    spectrum = torch.sort(lam, descending=True).values
    diag.update({
        "n_directions": int(lam.numel()),
        "eigenvalues_top": [float(x) for x in spectrum[:SPECTRUM_LEN]],
        "eigenvalue_stats": {"max": float(spectrum[0]) if spectrum.numel() else 0.0,
                             "median": float(spectrum.median()) if spectrum.numel() else 0.0,
                             "min": float(spectrum[-1]) if spectrum.numel() else 0.0},
        "dominance": {"safety": int((branch == 1).sum()), "utility": int((branch == 0).sum()),
                      "ratio": int((branch == 2).sum())},
        "directions_with_update": {"utility": int(present_u.sum()), "safety": int(present_s.sum())},
        "conflicts": {"count": int(conflict.sum()), "resolved": resolved,
                      "mean_safety_weight": float(w[conflict].mean()) if conflict.any() else None},
        "kept_rank": info["rank"], "numerical_rank": info["numerical_rank"], "residual_rel": info["residual_rel"],
        "fisher_mass_kept": {
            "safety": (1.0 - float((lam * (y - yS) ** 2).sum()) / es) if es > 0 else None,
            "utility": (1.0 - float(((y - yU) ** 2).sum()) / eu) if eu > 0 else None,
        },
        "mean_safety_weight": float(w.mean()) if w.numel() else 0.0,
        "alpha_lambda_max": float(al.max()) if al.numel() else 0.0,
    })
    return f, diag


def sweep(ctx: Context, alphas, *, rule: str = DEFAULTS["rule"], curvature: str = DEFAULTS["curvature"],
          gamma: float = DEFAULTS["gamma"], threshold: float = DEFAULTS["threshold"], topk: int | None = None,
          rank: int | None = None, fisher_at: str | None = DEFAULTS["fisher_at"]):
    if rule not in RULES:
        raise InputError(f"sst: rule must be one of {RULES}, got {rule!r}")
    if curvature not in CURVATURES:
        raise InputError(f"sst: curvature must be one of {CURVATURES}, got {curvature!r}")
    if rule == "hard" and not threshold > 1.0:
        raise InputError(f"sst: threshold must be > 1 (safety dominates where αλ >= threshold, utility where αλ <= 1/threshold), got {threshold}")
    if rule in ("topk", "additive") and (topk is None or int(topk) < 0):
        raise InputError(f"sst: rule={rule!r} needs topk=K >= 0 (the number of safety-dominant directions per layer to take)")
    if not gamma > 0:
        raise InputError(f"sst: gamma must be > 0, got {gamma}")
    if ctx.fisher is None:
        raise InputError("sst needs the Fisher of both objectives: pass --fisher DIR or --safety-data/--utility-data")
    _fisher({"curvature": curvature, "fisher_at": fisher_at})  # validates the pair
    fisher_at = fisher_point(curvature, fisher_at)
    kind = _kind(curvature)
    if kind == "diag_sub":  # a diag_sub or an exact diag result, read per layer by diag_restricted
        kinds = (at_kind("diag_sub", fisher_at), at_kind("diag", fisher_at))
        FUr = ctx.fisher.first("utility", kinds, "sst")[1]
        FSr = ctx.fisher.first("safety", kinds, "sst")[1]
    else:
        FUr = ctx.fisher.get("utility", kind, "sst")
        FSr = ctx.fisher.get("safety", kind, "sst")
    alphas = [float(a) for a in alphas]
    layers, diags = [{} for _ in alphas], [{} for _ in alphas]
    for name in ctx.iterate("sst"):
        p = _pencil(ctx, name, FUr, FSr, curvature, gamma, fisher_at)  # once per layer for all alphas
        for j, a in enumerate(alphas):
            layers[j][name], diags[j][name] = _at(p, name, a, rule, threshold, topk, rank)
    return [(L, {"summary": {**_summary(d), "fisher_at": fisher_at}, "layers": d}) for L, d in zip(layers, diags)]


def _summary(diags: dict) -> dict:
    return {
        "layers_total": len(diags),
        "kept_rank_total": sum(d["kept_rank"] for d in diags.values()),
        "conflicts_total": sum(d["conflicts"]["count"] for d in diags.values()),
        "resolved_total": {k: sum(d["conflicts"]["resolved"][k] for d in diags.values()) for k in ("safety", "utility", "ratio")},
    }


METHOD = Method("sst", from_sweep(sweep), DEFAULTS, _fisher, doc=__doc__, sweep=sweep)
