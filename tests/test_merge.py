"""sstmerge.merge: every method's adapter equals its fused merge, exactness of task arithmetic,
alpha = 0 returns the utility model, SST on constructed cases, and the formulas of the baselines."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from sstmerge import adapters as ad
from sstmerge.errors import InputError
from sstmerge.merge import METHODS, merge, merge_sweep
from test_merge_world import world  # noqa: F401  (fixture)

BACKEND = "torch"


def _peft_merged_weights(base, adapter_dir) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    pm = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), str(adapter_dir))
    return {k: v.detach() for k, v in pm.merge_and_unload().state_dict().items()}


def _fused(out) -> dict[str, torch.Tensor]:
    t = {}
    for f in sorted((out / "fused").glob("*.safetensors")):
        t.update(load_file(f))
    return t


@pytest.fixture(scope="module")
def merged(world, tmp_path_factory):
    """Every method at alpha = 1, written with its fused model."""
    root = tmp_path_factory.mktemp("merged")
    out = {}
    for m in METHODS:
        res = merge(m, world.base, world.utility, world.safety, alpha=1.0, fisher=world.fisher, out=root / m, dense=True,
                    backend=BACKEND, seed=0, **world.options(m))
        out[m] = (res, root / m)
    return out


@pytest.mark.parametrize("method", list(METHODS))
def test_adapter_applied_equals_fused_and_reloads(world, merged, method):
    res, out = merged[method]
    fused = _fused(out)
    base = {}
    for f in sorted(world.base.glob("*.safetensors")):
        base.update(load_file(f))
    assert sorted(fused) == sorted(base)
    peft = _peft_merged_weights(world.base, out)
    changed = 0
    for k, w in fused.items():
        if k.endswith(".weight") and k[: -len(".weight")] in res.layers:
            scale = float(w.abs().max())
            assert (w - peft[k]).abs().max() <= 4e-7 * scale + 1e-7, k  # fp32 round-off
            want = base[k].double() + res.layers[k[: -len(".weight")]].delta()
            assert (w.double() - want).abs().max() <= 4e-7 * scale + 1e-7, k
            changed += int(not torch.equal(w, base[k]))
        else:
            assert torch.equal(w, base[k]), k  # untouched tensors are copied bit for bit
    assert changed == len(res.layers)
    back = ad.load_adapter(out)  # and it loads in sstmerge
    for name, f in res.layers.items():
        d = f.delta()
        assert (back.layers[name].delta().double() - d).abs().max() <= 1e-6 * d.abs().max()
    assert json.loads((out / "diagnostics.json").read_text())["method"] == method
    assert json.loads((out / "merge.json").read_text())["fused"]["fused_layers"] == len(res.layers)


def test_task_arithmetic_is_the_exact_sum_of_deltas(world, merged):
    U, S = ad.load_adapter(world.utility), ad.load_adapter(world.safety)
    for alpha in (1.0, 0.37):
        res = merge("task_arithmetic", world.base, world.utility, world.safety, alpha=alpha) if alpha != 1.0 else merged["task_arithmetic"][0]
        for name in U.layers:
            want = U.layers[name].delta().double() + alpha * S.layers[name].delta().double()
            got = res.layers[name].delta()
            assert (got - want).abs().max() <= 1e-6 * want.abs().max()
            # and not the cross-term version (B_U + B_S)(A_U + A_S)
            u, s = U.layers[name], S.layers[name]
            cross = (u.scale * u.B + alpha * s.scale * s.B).double() @ (u.A + s.A).double()
            assert (cross - want).abs().max() > 1e-3 * want.abs().max()


@pytest.mark.parametrize("method", list(METHODS))
def test_alpha_zero_returns_the_utility_model(world, method, tmp_path):
    U = ad.load_adapter(world.utility)
    res = merge(method, world.base, world.utility, world.safety, alpha=0.0, fisher=world.fisher, out=tmp_path / "o",
                dense=True, backend=BACKEND, **world.options(method))
    fused = _fused(tmp_path / "o")
    base = {}
    for f in sorted(world.base.glob("*.safetensors")):
        base.update(load_file(f))
    eps = torch.finfo(torch.float32).eps
    for name, L in U.layers.items():
        want = L.delta().double()
        # the factors come from an fp32 SVD (randomized for the dense methods) of dU: its round-off is
        # ~eps x max(O, I) x ||dU||_2 (the rank rule's bound; LAPACK paths differ per CPU), and the fused
        # weight adds one fp32 rounding of w0 + dU
        svd_tol = eps * max(L.shape) * float(torch.linalg.matrix_norm(want, ord=2))
        assert (res.layers[name].delta() - want).abs().max() <= svd_tol, name
        w0 = base[f"{name}.weight"].double()
        fused_tol = svd_tol + eps * float((w0 + want).abs().max())
        assert (fused[f"{name}.weight"].double() - (w0 + want)).abs().max() <= fused_tol, name


def test_alpha_changes_the_model(world, merged):
    U = ad.load_adapter(world.utility)
    for m, (res, _) in merged.items():
        diff = max(float((res.layers[n].delta() - U.layers[n].delta().double()).abs().max()) for n in U.layers)
        assert diff > 1e-4, m


def test_unequal_ranks_merge(world, tmp_path):
    from test_merge_world import make_adapter, make_fisher

    s2 = make_adapter(world.base, tmp_path / "s2", r=2, alpha=2, seed=9)
    fisher = make_fisher(world.utility, s2, world.base)
    U, S = ad.load_adapter(world.utility), ad.load_adapter(s2)
    for m in METHODS:
        res = merge(m, world.base, world.utility, s2, alpha=1.0, fisher=fisher, backend=BACKEND, **world.options(m))
        assert set(res.layers) == set(U.layers)
    res = merge("task_arithmetic", world.base, world.utility, s2, alpha=2.0)
    for n in U.layers:
        assert res.layers[n].rank == 6
        want = U.layers[n].delta().double() + 2 * S.layers[n].delta().double()
        assert (res.layers[n].delta() - want).abs().max() <= 1e-6 * want.abs().max()


# ----------------------------------------------------------------------------- baselines' formulas

def test_fisher_avg_formula(world):
    U, S = ad.load_adapter(world.utility), ad.load_adapter(world.safety)
    res = merge("fisher_avg", world.base, world.utility, world.safety, alpha=0.7, fisher=world.fisher, rank="full")
    name = sorted(U.layers)[1]
    FU = world.fisher[("utility", "diag")].tensors[f"base_model.model.{name}.base_layer.weight"].double()
    FS = world.fisher[("safety", "diag")].tensors[f"base_model.model.{name}.base_layer.weight"].double()
    eps = 1e-6 * float((FU + FS).mean())
    dU, dS = U.layers[name].delta().double(), S.layers[name].delta().double()
    want = ((FU + eps) * dU + 0.7 * FS * dS) / (FU + eps + 0.7 * FS)
    assert (res.layers[name].delta() - want).abs().max() <= 1e-5 * want.abs().max()


def test_ties_trims_elects_and_averages(world):
    U, S = ad.load_adapter(world.utility), ad.load_adapter(world.safety)
    res = merge("ties", world.base, world.utility, world.safety, alpha=1.0, density=0.3, rank="full")
    name = sorted(U.layers)[0]
    dU, dS = U.layers[name].delta().double(), S.layers[name].delta().double()

    def trim(d):
        k = round(0.3 * d.numel())
        cut = d.abs().flatten().sort(descending=True).values[k - 1]
        return torch.where(d.abs() >= cut, d, torch.zeros_like(d))

    tu, ts = trim(dU), trim(dS)
    sign = torch.sign(tu + ts)
    au = (torch.sign(tu) == sign) & (tu != 0)
    as_ = (torch.sign(ts) == sign) & (ts != 0)
    want = (tu * au + ts * as_) / (au.double() + as_.double()).clamp_min(1)
    assert (res.layers[name].delta() - want).abs().max() <= 1e-5 * want.abs().max()
    assert float((want == 0).double().mean()) > 0.4  # trimming really happened


def test_dare_is_seeded_and_unbiased_in_shape(world):
    a = merge("dare", world.base, world.utility, world.safety, alpha=1.0, density=0.5, seed=1, rank="full")
    b = merge("dare", world.base, world.utility, world.safety, alpha=1.0, density=0.5, seed=1, rank="full")
    c = merge("dare", world.base, world.utility, world.safety, alpha=1.0, density=0.5, seed=2, rank="full")
    name = sorted(a.layers)[0]
    assert torch.equal(a.layers[name].delta(), b.layers[name].delta())
    assert not torch.allclose(a.layers[name].delta(), c.layers[name].delta())
    U, S = ad.load_adapter(world.utility), ad.load_adapter(world.safety)
    dU, dS = U.layers[name].delta().double(), S.layers[name].delta().double()
    d = a.layers[name].delta()
    # each entry of DARE(dU) + DARE(dS) (density 0.5) is one of 0, 2 dU, 2 dS, 2 (dU + dS)
    cands = torch.stack([torch.zeros_like(dU), 2 * dU, 2 * dS, 2 * (dU + dS)])
    dist = (cands - d).abs()
    tol = 1e-5 * float(d.abs().max())
    assert bool((dist.min(dim=0).values <= tol).all())
    which = dist.argmin(dim=0)
    frac = torch.bincount(which.flatten(), minlength=4).double() / which.numel()
    assert torch.allclose(frac, torch.full((4,), 0.25, dtype=torch.float64), atol=0.05)  # independent keeps


@pytest.mark.parametrize("method", ["ties", "dare", "fisher_avg"])
def test_dense_methods_truncate_to_the_adapters_rank_and_report_the_exact_residual(world, method):
    U, S = ad.load_adapter(world.utility), ad.load_adapter(world.safety)
    alphas = [0.5, 1.0, 4.0]
    lows = merge_sweep(method, world.base, world.utility, world.safety, alphas=alphas, fisher=world.fisher, seed=3)
    fulls = merge_sweep(method, world.base, world.utility, world.safety, alphas=alphas, fisher=world.fisher, seed=3,
                        rank="full")
    eps = torch.finfo(torch.float32).eps
    for low, full in zip(lows, fulls):
        for name, f in low.layers.items():
            k = U.layers[name].rank + S.layers[name].rank
            assert f.rank == k < full.layers[name].rank
            D = full.layers[name].delta()  # the dense result (to fp32 round-off of its full SVD)
            s = torch.linalg.svdvals(D)
            got = float((D - f.delta()).norm() / D.norm())
            best = float(s[k:].norm() / s.norm())  # Eckart-Young: no rank-k factor does better
            d = low.diagnostics["layers"][name]
            # fp32 factors and SVDs of an [O, I] matrix: round-off ~ eps x max(O, I) relative to ||D||
            tol = eps * max(D.shape) * float(s[0] / D.norm())
            assert abs(d["residual_rel"] - got) <= tol and got >= best - tol and 0 < best
            # the randomized range (p = 10 extra columns, 2 power iterations) is near-optimal: its
            # error exceeds the best's by a factor 1 + O((s_k+1 / s_k)^(2q+1)) (Halko et al. 2011, 10.4)
            assert got <= 1.1 * best + tol, (name, low.alpha, got, best)
            assert d["rank"] == k and d["rank_rule"] == "r_U + r_S"


@pytest.mark.parametrize("method", list(METHODS))
def test_a_sweep_equals_separate_merges(world, method):
    """merge_sweep does each layer's alpha-independent work once; the factors are those of merge()."""
    alphas = [0.0, 0.5, 2.0]
    opts = world.options(method)
    swept = merge_sweep(method, world.base, world.utility, world.safety, alphas=alphas, fisher=world.fisher, seed=1, **opts)
    for a, r in zip(alphas, swept):
        one = merge(method, world.base, world.utility, world.safety, alpha=a, fisher=world.fisher, seed=1, **opts)
        assert r.alpha == a and sorted(r.layers) == sorted(one.layers)
        for name, f in one.layers.items():
            assert torch.equal(f.B, r.layers[name].B) and torch.equal(f.A, r.layers[name].A), (method, a, name)
        assert r.info["sweep"]["alphas"] == alphas


def test_a_rules_shared_range_is_near_optimal_at_every_alpha(monkeypatch):
    """fisher_avg's sweep projects every D(α) onto orth[B_U, B_S, range(D(1))]: on a layer with
    Kronecker-like log-normal Fishers (a b^T ⊙ exp(N(0,1)), as activation x gradient scales give)
    the error stays within 5 % of Eckart-Young from α = 1/8 to 8, and the reported residual is exact."""
    from sstmerge.merge import dense

    monkeypatch.setattr(dense, "ROW_BLOCK_ENTRIES", 4096)  # several row blocks
    gen = torch.Generator().manual_seed(0)
    O, I, r = 300, 500, 8

    def lora():
        return SimpleNamespace(B=torch.randn(O, r, generator=gen) * 0.05, A=torch.randn(r, I, generator=gen) / I ** 0.5,
                               scale=2.0, shape=(O, I))

    def fisher():
        a, b = torch.rand(O, 1, generator=gen) ** 4, torch.rand(1, I, generator=gen) ** 4
        return a * b * torch.exp(torch.randn(O, I, generator=gen))

    dl = dense.Deltas(lora(), lora(), torch.device("cpu"))
    FU, FS = fisher(), fisher()
    floor = 1e-6 * float((FU + FS).mean())

    def rule(alphas, r0, r1, du, ds):
        w = FS[r0:r1] / (FU[r0:r1] + floor)
        return [(du + (a * w) / (a * w + 1) * (ds - du), {}) for a in alphas]

    alphas = [0.125, 0.5, 1.0, 4.0, 8.0]
    D = torch.empty(O, I)
    got = dense.rule_factors(dl, rule, alphas, 2 * r, torch.Generator().manual_seed(1), D)
    eps = torch.finfo(torch.float32).eps
    for a, (f, fi) in zip(alphas, got):
        Da = torch.cat([rule([a], r0, r1, dl.u(r0, r1), dl.s(r0, r1))[0][0] for r0, r1 in dense.row_blocks(O, I)])
        s = torch.linalg.svdvals(Da.double())
        best = float(s[2 * r:].norm() / s.norm())
        err = float((Da - f.B @ f.A).norm() / Da.norm())
        assert abs(fi["residual_rel"] - err) <= eps * max(O, I)  # fp32 products over [O, I]: ~eps x max(O, I)
        assert best - eps * max(O, I) <= err <= 1.05 * best, (a, err, best)


def test_kth_largest_abs_is_exact_with_ties_and_blocks(monkeypatch):
    from sstmerge.merge import dense

    monkeypatch.setattr(dense, "ROW_BLOCK_ENTRIES", 64)  # many row blocks
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(37, 23, generator=gen)
    X[3, :5] = 0.5  # ties
    X[7, 2] = -0.5
    srt = X.abs().flatten().sort(descending=True).values
    for k in (1, 2, 17, 100, 400, X.numel()):
        assert dense.kth_largest_abs(lambda a, b: X[a:b], *X.shape, k) == float(srt[k - 1])


def test_pooled_fisher_avg_uses_tile_means(world):
    from sstmerge.fisher.restrict import pool_shape, pool_sum, tile_counts

    U, S = ad.load_adapter(world.utility), ad.load_adapter(world.safety)
    pooled = {}
    for role in ("utility", "safety"):
        fr = world.fisher[(role, "diag")]
        tensors, pools = {}, {}
        for key, F in fr.tensors.items():
            po, pi = pool_shape(*F.shape, 700)
            tensors[key] = pool_sum(F, po, pi) / tile_counts(*F.shape, po, pi)
            pools[key] = [po, pi]
        pooled[(role, "diag_pool")] = SimpleNamespace(kind="diag", tensors=tensors, meta={"pool": json.dumps(pools)})
    res = merge("fisher_avg", world.base, world.utility, world.safety, alpha=0.7, fisher=pooled, rank="full")
    assert res.diagnostics["layers"][sorted(U.layers)[0]]["fisher_tiles"] > 1
    for name in U.layers:
        key = f"base_model.model.{name}.base_layer.weight"
        F = {r: world.fisher[(r, "diag")].tensors[key].double() for r in ("utility", "safety")}
        po, pi = pool_shape(*F["utility"].shape, 700)
        T = {r: (pool_sum(f, po, pi) / tile_counts(*f.shape, po, pi, None).double())
             .repeat_interleave(po, 0).repeat_interleave(pi, 1)[: f.shape[0], : f.shape[1]] for r, f in F.items()}
        eps = 1e-6 * float((T["utility"] + T["safety"]).mean())
        dU, dS = U.layers[name].delta().double(), S.layers[name].delta().double()
        want = ((T["utility"] + eps) * dU + 0.7 * T["safety"] * dS) / (T["utility"] + eps + 0.7 * T["safety"])
        # fp32 rule and fp32 full SVD of the [O, I] result
        tol = torch.finfo(torch.float32).eps * max(want.shape) * float(torch.linalg.matrix_norm(want, ord=2))
        assert (res.layers[name].delta() - want).abs().max() <= tol, name


def test_sst_from_a_diag_sub_fisher_equals_sst_from_the_exact_diag(world):
    from sstmerge.fisher.restrict import restrict_diag

    sub = ad.joint_subspace(ad.load_adapter(world.utility), ad.load_adapter(world.safety))
    restricted = {}
    for role in ("utility", "safety"):
        t = {}
        for name, (qi, qo) in sub.items():
            F = world.fisher[(role, "diag@base")].tensors[f"base_model.model.{name}.base_layer.weight"]
            t[f"{name}.fisher"] = restrict_diag(F, qi, qo).float()
            t[f"{name}.q_in"], t[f"{name}.q_out"] = qi, qo
        restricted[(role, "diag_sub@base")] = SimpleNamespace(kind="diag", tensors=t, meta={})  # SST's default point
    a = merge("sst", world.base, world.utility, world.safety, alpha=1.0, fisher=world.fisher)
    b = merge("sst", world.base, world.utility, world.safety, alpha=1.0, fisher=restricted)
    for name in a.layers:
        da, db = a.layers[name].delta(), b.layers[name].delta()
        # the diag_sub result is stored in fp32 (rel. eps/2); amplified by the damped pencil's
        # conditioning, bounded here by 1/gamma (gamma = 1e-4 of the mean eigenvalue)
        tol = torch.finfo(torch.float32).eps / 1e-4 * float(da.abs().max())
        assert (da - db).abs().max() <= tol, name


def _projector(A, B, name, k):
    """The explicit O x O projector onto the top-k left singular vectors of A - B (the method never builds one)."""
    V = A.get(f"{name}.weight").double() - B.get(f"{name}.weight").double()
    Uv = torch.linalg.svd(V)[0][:, :k]
    return Uv @ Uv.T, V


def test_safe_lora_serves_the_aligned_model_with_the_projected_update(world):
    """The published form: W_aligned + P dU in the selected layers, nothing else added. Here the aligned
    model is the base + an independent rank-3 update T, so dM = alpha T + dU - alpha (I - P) dU."""
    from sstmerge.merge.writers import ModelFiles

    U = ad.load_adapter(world.utility)
    res = merge("safe_lora", world.base, world.utility, world.safety, alpha=0.6, threshold=1.01,
                align_model=str(world.aligned))
    A, B = ModelFiles(world.aligned), ModelFiles(world.base)
    eps = torch.finfo(torch.float32).eps
    for name in U.layers:
        P, V = _projector(A, B, name, 3)  # V's rank is 3, below the default k (the safety rank, 4)
        dU = U.layers[name].delta().double()
        want = 0.6 * V + dU - 0.6 * (dU - P @ dU)  # threshold > 1 selects every layer
        # T's factors drop V's round-off (the fused weight's fp32 rounding, <= eps |W| per entry)
        tol = 1e-5 * float(want.abs().max()) + eps * float(A.get(f"{name}.weight").abs().max())
        assert (res.layers[name].delta() - want).abs().max() <= tol, name
        d = res.diagnostics["layers"][name]
        assert d["align_source"] == "model_pair" and d["align_rank"] == 3 and d["served_offset_rank"] == 3
    assert res.diagnostics["projected_layers"] == len(U.layers)


def test_safe_lora_adds_nothing_when_the_base_is_the_aligned_model(world, tmp_path):
    """As in the paper (the adapter trained on the aligned model): V from the pair, dM = dU - alpha (I - P) dU."""
    from sstmerge.merge.writers import ModelFiles
    from test_merge_world import make_base

    unaligned = make_base(tmp_path / "pretrained", seed=7)
    U = ad.load_adapter(world.utility)
    res = merge("safe_lora", world.base, world.utility, world.safety, alpha=0.6, threshold=1.01,
                align_model=str(world.base), align_base=str(unaligned), align_rank=5)
    for name in U.layers:
        P, _ = _projector(ModelFiles(world.base), ModelFiles(unaligned), name, 5)
        dU = U.layers[name].delta().double()
        want = dU - 0.6 * (dU - P @ dU)
        assert (res.layers[name].delta() - want).abs().max() <= 1e-5 * want.abs().max(), name
        assert "served_offset_rank" not in res.diagnostics["layers"][name]


def test_safe_lora_adapter_projects_onto_a_pair_and_adds_ds(world, tmp_path):
    """The variant: P from the pair (or the safety update), plus alpha dS."""
    from sstmerge.merge.writers import ModelFiles
    from test_merge_world import make_base

    aligned = make_base(tmp_path / "aligned", seed=7)
    U, S = ad.load_adapter(world.utility), ad.load_adapter(world.safety)
    res = merge("safe_lora_adapter", world.base, world.utility, world.safety, alpha=0.6, threshold=1.01,
                align_model=str(aligned), align_rank=5)
    for name in U.layers:
        P, _ = _projector(ModelFiles(aligned), ModelFiles(world.base), name, 5)
        dU, dS = U.layers[name].delta().double(), S.layers[name].delta().double()
        want = dU - 0.6 * (dU - P @ dU) + 0.6 * dS
        assert (res.layers[name].delta() - want).abs().max() <= 1e-5 * want.abs().max(), name
    assert res.diagnostics["projected_layers"] == len(U.layers)
    own = merge("safe_lora_adapter", world.base, world.utility, world.safety, alpha=0.6, threshold=1.01)
    assert {d["align_source"] for d in own.diagnostics["layers"].values()} == {"safety_adapter"}


def test_safe_lora_and_safemerge_refuse_a_missing_or_unusable_pair(world, tmp_path):
    from test_merge_world import make_base

    for m, hint in (("safe_lora", "safe_lora_adapter"), ("safemerge", "safemerge_adapter")):
        with pytest.raises(InputError, match=hint):
            merge(m, world.base, world.utility, world.safety, alpha=1.0)
    other = make_base(tmp_path / "other", seed=7)  # differs from the base at full rank: not base + an update
    with pytest.raises(InputError, match="not a low-rank update"):
        merge("safe_lora", world.base, world.utility, world.safety, alpha=1.0, align_model=str(other))
    with pytest.raises(InputError, match="would be zero"):
        merge("safe_lora", world.base, world.utility, world.safety, alpha=1.0, align_model=str(world.base))


@pytest.mark.parametrize("method", ["safemerge", "safemerge_adapter"])
def test_safemerge_selects_layers_by_cosine(world, method):
    """The cosine is ||P dU|| / ||dU||, P onto the pair's V (safemerge) or the safety update (the variant)."""
    from sstmerge.merge.writers import ModelFiles

    U, S = ad.load_adapter(world.utility), ad.load_adapter(world.safety)
    opts = world.options(method)
    probe = merge(method, world.base, world.utility, world.safety, alpha=1.0, threshold=1.01, **opts)
    cos = {n: d["cosine"] for n, d in probe.diagnostics["layers"].items()}
    for name in U.layers:
        if opts:
            V = ModelFiles(world.aligned).get(f"{name}.weight").double() - ModelFiles(world.base).get(f"{name}.weight").double()
            Q = torch.linalg.svd(V)[0][:, :3]
        else:
            Q = ad.orth(S.layers[name].delta()).double()
        dU = U.layers[name].delta().double()
        assert abs(cos[name] - float((Q.T @ dU).norm() / dU.norm())) < 1e-5
    cut = sorted(cos.values())[len(cos) // 2]
    res = merge(method, world.base, world.utility, world.safety, alpha=1.0, threshold=cut, **opts)
    for name in U.layers:
        dU, dS = U.layers[name].delta().double(), S.layers[name].delta().double()
        want = dU + dS if cos[name] < cut else dU
        assert (res.layers[name].delta() - want).abs().max() <= 1e-5 * want.abs().max()
    assert 0 < res.diagnostics["merged_layers"] < len(U.layers)


def test_regmean_matches_its_closed_form_and_sst_input_soft(world):
    U, S = ad.load_adapter(world.utility), ad.load_adapter(world.safety)
    alpha = 1.3
    res = merge("regmean", world.base, world.utility, world.safety, alpha=alpha, fisher=world.fisher)
    sst = merge("sst", world.base, world.utility, world.safety, alpha=alpha, fisher=world.fisher, curvature="input",
                rule="soft", gamma=1e-4)
    for name in U.layers:
        qi, qo = ad.joint_layer(U.layers[name], S.layers[name])
        qi, qo = qi.double(), qo.double()
        AU = world.fisher[("utility", "kfac")].tensors[f"{name}.A"].double()
        AS = world.fisher[("safety", "kfac")].tensors[f"{name}.A"].double()
        MU = qo.T @ U.layers[name].delta().double() @ qi
        MS = qo.T @ S.layers[name].delta().double() @ qi
        eps = 1e-4 * float(torch.trace(AU + AS)) / AU.shape[0]
        K = AU + eps * torch.eye(AU.shape[0], dtype=AU.dtype)
        M = (MU @ K + alpha * MS @ AS) @ torch.linalg.inv(K + alpha * AS)
        want = qo @ M @ qi.T
        assert (res.layers[name].delta() - want).abs().max() <= 1e-5 * want.abs().max()
        # SST with the input-side curvature and the soft rule is the same closed form (damping on A_U only)
        gA = 1e-4 * float(torch.trace(AU)) / AU.shape[0]
        K2 = AU + gA * torch.eye(AU.shape[0], dtype=AU.dtype)
        want2 = qo @ ((MU @ K2 + alpha * MS @ AS) @ torch.linalg.inv(K2 + alpha * AS)) @ qi.T
        assert (sst.layers[name].delta() - want2).abs().max() <= 1e-5 * want2.abs().max()


# ----------------------------------------------------------------------------- SST on constructed cases

def _block_world(tmp_path, overlap: bool):
    """Base + two adapters whose updates live in separate coordinate blocks (or share one), and
    Fishers whose blocks are disjoint (or overlap), built in the joint subspace."""
    from test_merge_world import make_base

    base = make_base(tmp_path / "base")
    from sstmerge.merge.writers import ModelFiles

    shapes = {n: s for n, s in ModelFiles(base).linear_shapes().items() if n.endswith("q_proj")}
    gen = torch.Generator().manual_seed(0)
    lu, ls = {}, {}
    for name, (O, I) in shapes.items():
        r = 2
        AU = torch.zeros(r, I)
        AU[0, 0], AU[1, 1] = 1.0, 1.0
        BU = torch.zeros(O, r)
        BU[0, 0], BU[1, 1] = 1.0, 1.0
        AS = torch.zeros(r, I)
        BS = torch.zeros(O, r)
        if overlap:  # the safety update shares input direction 1 and output direction 1 with utility
            AS[0, 1], AS[1, 2] = 1.0, 1.0
            BS[1, 0], BS[2, 1] = 1.0, 1.0
        else:
            AS[0, 2], AS[1, 3] = 1.0, 1.0
            BS[2, 0], BS[3, 1] = 1.0, 1.0
        lu[name] = (BU * torch.tensor([0.5, -0.3]), AU, 1.0)
        ls[name] = (BS * torch.tensor([0.7, 0.4]), AS, 1.0)
    paths = []
    for tag, layers in (("u", lu), ("s", ls)):
        d = tmp_path / tag
        d.mkdir()
        ad.save_adapter(d, layers, base_model=str(base))
        paths.append(d)
    U, S = ad.load_adapter(paths[0]), ad.load_adapter(paths[1])
    fisher = {}
    for role, X in (("utility", U), ("safety", S)):
        tensors = {}
        for name in U.layers:
            qi, qo = ad.joint_layer(U.layers[name], S.layers[name])
            # Fisher = identity on the coordinates of this role's own update, zero elsewhere
            M = qo.T.double() @ X.layers[name].delta().double() @ qi.double()
            support = (M.abs() > 1e-9).double().reshape(-1)
            if role == "safety" and overlap:  # the shared coordinate matters to both objectives
                MU = qo.T.double() @ U.layers[name].delta().double() @ qi.double()
                support = torch.maximum(support, (MU.abs() > 1e-9).double().reshape(-1))
            tensors[f"{name}.fisher"] = torch.diag(support * (1.0 + torch.rand(support.numel(), generator=gen, dtype=torch.float64))).float()
            tensors[f"{name}.q_in"], tensors[f"{name}.q_out"] = qi, qo
        fisher[role] = SimpleNamespace(kind="subspace", tensors=tensors, meta={})
    return base, paths[0], paths[1], U, S, fisher


def test_sst_keeps_each_update_whole_when_subspaces_and_fisher_blocks_are_separate(tmp_path):
    base, up, sp, U, S, fisher = _block_world(tmp_path, overlap=False)
    for rule in ("hard", "soft"):
        res = merge("sst", base, up, sp, alpha=1.0, fisher=fisher, curvature="exact", rule=rule, gamma=1e-6)
        for name in U.layers:
            want = U.layers[name].delta().double() + S.layers[name].delta().double()
            err = float((res.layers[name].delta() - want).abs().max())
            # hard: safety-dominant block taken whole; soft: weight αλ/(1+αλ) with λ ~ 1/gamma
            assert err <= (1e-6 if rule == "hard" else 1e-4) * float(want.abs().max()), (rule, err)
            d = res.diagnostics["layers"][name]
            assert d["conflicts"]["count"] == 0
            assert d["m_in"] == 4 and d["m_out"] == 4 and d["kept_rank"] == 4
            assert d["fisher_mass_kept"]["safety"] > 0.999 and d["fisher_mass_kept"]["utility"] > 0.999


def test_sst_reports_and_resolves_conflicts_when_they_overlap(tmp_path):
    base, up, sp, U, S, fisher = _block_world(tmp_path, overlap=True)
    for alpha, side in ((1e6, "safety"), (1e-6, "utility")):
        res = merge("sst", base, up, sp, alpha=alpha, fisher=fisher, curvature="exact", rule="hard", threshold=4.0,
                    gamma=1e-3)
        for name in U.layers:
            d = res.diagnostics["layers"][name]
            assert d["conflicts"]["count"] >= 1
            assert d["conflicts"]["resolved"][side] == d["conflicts"]["count"]
    res = merge("sst", base, up, sp, alpha=1.0, fisher=fisher, curvature="exact", rule="soft", gamma=1e-3)
    for name in U.layers:
        d = res.diagnostics["layers"][name]
        assert d["conflicts"]["count"] >= 1 and d["conflicts"]["resolved"]["ratio"] == d["conflicts"]["count"]
        assert 0.0 < d["conflicts"]["mean_safety_weight"] < 1.0
        assert d["fisher_mass_kept"]["safety"] < 0.999 and d["fisher_mass_kept"]["utility"] < 0.999
        # the shared coordinate (out 1, in 1) is the Fisher-weighted average of the two values
        qi, qo = ad.joint_layer(U.layers[name], S.layers[name])
        M = qo.T.double() @ res.layers[name].delta() @ qi.double()
        MU = qo.T.double() @ U.layers[name].delta().double() @ qi.double()
        MS = qo.T.double() @ S.layers[name].delta().double() @ qi.double()
        FU = fisher["utility"].tensors[f"{name}.fisher"].double()
        FS = fisher["safety"].tensors[f"{name}.fisher"].double()
        g = 1e-3 * float(torch.trace(FU)) / FU.shape[0]
        FUd = FU + g * torch.eye(FU.shape[0], dtype=FU.dtype)
        c = torch.linalg.solve(FUd + FS, FUd @ MU.reshape(-1) + FS @ MS.reshape(-1))
        assert torch.allclose(M.reshape(-1), c, atol=1e-6)


@pytest.mark.parametrize("k", [0, 1, 3, 10**6])
def test_sst_additive_keeps_du_whole_and_adds_the_top_k_safety_components(tmp_path, k):
    """rule=additive: c = c_U + α Σ_{j in top-k λ} (component of c_S along v_j). With diagonal
    (exact-curvature) Fisher blocks the generalized eigenvectors are the coordinate axes, so the
    expected update is c_U plus α c_S on the k coordinates of largest F_S / (F_U + γ); k >= n is
    task arithmetic, k = 0 the utility update."""
    base, up, sp, U, S, fisher = _block_world(tmp_path, overlap=True)
    alpha, gamma = 1.5, 1e-3
    res = merge("sst", base, up, sp, alpha=alpha, fisher=fisher, curvature="exact", rule="additive", topk=k, gamma=gamma)
    for name in U.layers:
        qi, qo = ad.joint_layer(U.layers[name], S.layers[name])
        MU = qo.T.double() @ U.layers[name].delta().double() @ qi.double()
        MS = qo.T.double() @ S.layers[name].delta().double() @ qi.double()
        FU = torch.diagonal(fisher["utility"].tensors[f"{name}.fisher"].double())
        FS = torch.diagonal(fisher["safety"].tensors[f"{name}.fisher"].double())
        lam = FS / (FU + gamma * float(FU.sum()) / FU.numel())
        top = torch.argsort(lam, descending=True)[:min(k, lam.numel())]
        mask = torch.zeros_like(lam)
        mask[top] = 1.0
        want = MU.reshape(-1) + alpha * mask * MS.reshape(-1)
        got = (qo.T.double() @ res.layers[name].delta() @ qi.double()).reshape(-1)
        # fp32 factors of an O(1) update: a few fp32 eps of the largest entry
        assert torch.allclose(got, want, atol=1e-5 * float(want.abs().max())), (name, k)
        d = res.diagnostics["layers"][name]
        assert d["rule"] == "additive" and d["dominance"]["safety"] == min(k, lam.numel())
        if k == 0:
            assert d["fisher_mass_kept"]["utility"] == pytest.approx(1.0, abs=1e-9)


def test_sst_additive_and_topk_need_k(world):
    for rule in ("additive", "topk"):
        with pytest.raises(InputError, match="needs topk"):
            merge("sst", world.base, world.utility, world.safety, alpha=1.0, fisher=world.fisher, rule=rule)


def test_sst_kfac_and_topk_run_and_rank_option_truncates(world):
    res = merge("sst", world.base, world.utility, world.safety, alpha=1.0, fisher=world.fisher, curvature="kfac",
                rule="topk", topk=5)
    for d in res.diagnostics["layers"].values():
        assert d["dominance"]["safety"] == 5
    res = merge("sst", world.base, world.utility, world.safety, alpha=1.0, fisher=world.fisher, rank=3)
    for name, d in res.diagnostics["layers"].items():
        assert res.layers[name].rank == 3 and d["kept_rank"] == 3 and d["residual_rel"] > 0


def test_sst_kfac_soft_is_the_kronecker_fisher_weighted_solution(world):
    """rule=soft with curvature=kfac minimises the quadratic with F_U' = (G_U+g_G)⊗(A_U+g_A), F_S = G_S⊗A_S."""
    U, S = ad.load_adapter(world.utility), ad.load_adapter(world.safety)
    alpha = 0.8
    res = merge("sst", world.base, world.utility, world.safety, alpha=alpha, fisher=world.fisher, curvature="kfac",
                rule="soft", gamma=1e-3)
    for name in list(U.layers)[:3]:
        qi, qo = ad.joint_layer(U.layers[name], S.layers[name])
        qi, qo = qi.double(), qo.double()
        t = {r: world.fisher[(r, "kfac")].tensors for r in ("utility", "safety")}
        AU, GU = t["utility"][f"{name}.A"].double(), t["utility"][f"{name}.G"].double()
        AS, GS = t["safety"][f"{name}.A"].double(), t["safety"][f"{name}.G"].double()
        AUd = AU + 1e-3 * torch.trace(AU) / AU.shape[0] * torch.eye(AU.shape[0], dtype=AU.dtype)
        GUd = GU + 1e-3 * torch.trace(GU) / GU.shape[0] * torch.eye(GU.shape[0], dtype=GU.dtype)
        FUd, FS = torch.kron(GUd, AUd), torch.kron(GS, AS)
        cU = (qo.T @ U.layers[name].delta().double() @ qi).reshape(-1)
        cS = (qo.T @ S.layers[name].delta().double() @ qi).reshape(-1)
        c = torch.linalg.solve(FUd + alpha * FS, FUd @ cU + alpha * FS @ cS)
        want = qo @ c.reshape(qo.shape[1], qi.shape[1]) @ qi.T
        assert (res.layers[name].delta() - want).abs().max() <= 1e-5 * want.abs().max()


def test_sst_diag_soft_is_the_diagonal_fisher_weighted_solution_in_the_subspace(world):
    """curvature=diag (the default), rule=soft: over updates c in the joint subspace (dW = K c,
    K = Q_out ⊗ Q_in) it minimises Σ F_U (dW - dU)² + α Σ F_S (dW - dS)² + γ_abs |c - c_U|², i.e.
    the entry-wise Fisher-weighted objective of fisher_avg restricted to the subspace."""
    U, S = ad.load_adapter(world.utility), ad.load_adapter(world.safety)
    alpha, gamma = 0.8, 1e-3
    res = merge("sst", world.base, world.utility, world.safety, alpha=alpha, fisher=world.fisher, rule="soft",
                gamma=gamma)
    for name in list(U.layers)[:3]:
        assert res.diagnostics["layers"][name]["curvature"] == "diag"
        qi, qo = ad.joint_layer(U.layers[name], S.layers[name])
        qi, qo = qi.double(), qo.double()
        key = f"base_model.model.{name}.base_layer.weight"
        FU = world.fisher[("utility", "diag@base")].tensors[key].double().reshape(-1)  # SST's default point
        FS = world.fisher[("safety", "diag@base")].tensors[key].double().reshape(-1)
        K = torch.kron(qo, qi)  # vec(qo M qi^T) = K vec(M), row-major
        FUs, FSs = K.T @ (FU[:, None] * K), K.T @ (FS[:, None] * K)
        FUd = FUs + gamma * torch.trace(FUs) / FUs.shape[0] * torch.eye(FUs.shape[0], dtype=FUs.dtype)
        cU = (qo.T @ U.layers[name].delta().double() @ qi).reshape(-1)
        cS = (qo.T @ S.layers[name].delta().double() @ qi).reshape(-1)
        c = torch.linalg.solve(FUd + alpha * FSs, FUd @ cU + alpha * FSs @ cS)
        want = qo @ c.reshape(qo.shape[1], qi.shape[1]) @ qi.T
        assert (res.layers[name].delta() - want).abs().max() <= 1e-5 * want.abs().max()
