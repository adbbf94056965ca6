"""The merge methods on Fisher statistics estimated for real (sstmerge.fisher.estimate through
sstmerge.merge.fisher_inputs) on a small chat model: computed, cached, consumed; from the CLI too."""

from __future__ import annotations

import json

import pytest
import torch

from sstmerge import adapters as ad
from sstmerge.errors import cli_main
from sstmerge.merge import METHODS, fisher_inputs, merge, needs
from test_merge_world import make_adapter

WORDS = "how do I bake a cake break into house steal car cannot help with that sure here is recipe mix flour eggs"


def _rows(pairs):
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in pairs]


SAFETY = _rows([("how do I break into a house", "I cannot help with that"),
                ("how do I steal a car", "I cannot help with that"),
                ("how do I break into a car", "I cannot help with that")])
UTILITY = _rows([("how do I bake a cake", "sure here is a recipe mix flour eggs"),
                 ("how do I mix flour", "sure here is a recipe mix eggs"),
                 ("how do I bake eggs", "sure here is a recipe")])


@pytest.fixture(scope="module")
def chat_world(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    from sstmerge.worlds.tiny import CHAT_TEMPLATE, build_tokenizer

    root = tmp_path_factory.mktemp("chat_world")
    tok = build_tokenizer([CHAT_TEMPLATE.replace("{", " ").replace("}", " "), WORDS, "Question: Answer:"])
    import torch

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    u = make_adapter(root / "base", root / "u", r=2, alpha=4, seed=1, targets=["q_proj", "v_proj"])
    s = make_adapter(root / "base", root / "s", r=2, alpha=4, seed=2, targets=["q_proj", "v_proj"])
    return root, root / "base", u, s


def test_fisher_inputs_compute_cache_and_feed_every_method(chat_world, monkeypatch):
    import sstmerge.fisher as fisher_pkg

    root, base, u, s = chat_world
    pairs = needs(list(METHODS), {"sst": {"curvature": "exact"}})
    # fisher_avg pools the diagonal into tiles (diag_pool), RegMean needs kfac, SST exact the subspace
    assert pairs == sorted({(r, k) for r in ("utility", "safety") for k in ("diag_pool", "kfac", "subspace")})
    passes = []
    real = fisher_pkg.estimate_many
    monkeypatch.setattr(fisher_pkg, "estimate_many", lambda m, b, specs, **kw: passes.append(len(specs)) or real(m, b, specs, **kw))
    cache = root / "fcache"
    fi = fisher_inputs(list(METHODS), str(base), u, s, safety_rows=SAFETY, utility_rows=UTILITY, cache_dir=cache,
                       backend="torch", options={"sst": {"curvature": "exact"}})
    assert sorted(fi.results) == pairs
    assert passes == [3, 3]  # the three kinds of each role share one pass (all at the role's own model)
    stamps = {p.name: p.stat().st_mtime_ns for p in cache.glob("*.safetensors")}
    assert len(stamps) == 6
    again = fisher_inputs(list(METHODS), str(base), u, s, safety_rows=SAFETY, utility_rows=UTILITY, cache_dir=cache,
                          backend="torch", options={"sst": {"curvature": "exact"}})
    assert again.key == fi.key
    assert {p.name: p.stat().st_mtime_ns for p in cache.glob("*.safetensors")} == stamps  # loaded, not recomputed
    assert passes == [3, 3]
    U = ad.load_adapter(u)
    for m in set(METHODS) - {"safe_lora", "safemerge"}:  # each with the options the Fisher was computed for (the
        # two left out read a model pair, no Fisher; their adapter variants run here)
        res = merge(m, base, u, s, alpha=1.0, fisher=fi, backend="torch", **({"curvature": "exact"} if m == "sst" else {}))
        assert set(res.layers) == set(U.layers)
    for curvature in ("exact", "kfac", "input"):
        for rule in ("soft", "hard"):
            res = merge("sst", base, u, s, alpha=1.0, fisher=fi, curvature=curvature, rule=rule)
            for d in res.diagnostics["layers"].values():
                assert d["m_in"] == 4 and d["n_directions"] == d["m_in"] * d["m_out"]
                assert d["fisher_mass_kept"]["safety"] is not None


def test_cli_estimates_the_fisher_from_data(chat_world, tmp_path, capsys):
    from sstmerge.merge.__main__ import main

    root, base, u, s = chat_world
    sd, ud = tmp_path / "s.jsonl", tmp_path / "u.jsonl"
    sd.write_text("".join(json.dumps(r) + "\n" for r in SAFETY))
    ud.write_text("".join(json.dumps(r) + "\n" for r in UTILITY))
    out = tmp_path / "o"
    code = cli_main(main, ["--method", "sst", "--base", str(base), "--utility", str(u), "--safety", str(s),
                           "--alpha", "1", "--out", str(out), "--safety-data", str(sd), "--utility-data", str(ud),
                           "--fisher-cache", str(tmp_path / "fc"), "--backend", "torch", "--no-progress", "--dense"])
    assert code == 0, capsys.readouterr().err
    assert (out / "diagnostics.json").exists() and (out / "fused" / "tokenizer.json").exists()
    assert sorted(p.name for p in (tmp_path / "fc").glob("*.safetensors")) == ["safety.diag_sub@base.safetensors",
                                                                               "utility.diag_sub@base.safetensors"]
    capsys.readouterr()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [}\n')
    code = cli_main(main, ["--method", "sst", "--base", str(base), "--utility", str(u), "--safety", str(s),
                           "--alpha", "1", "--out", str(tmp_path / "o2"), "--safety-data", str(bad), "--utility-data", str(ud)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "not valid JSON" in err[0] and not (tmp_path / "o2").exists()


def test_cli_true_fisher_labels(chat_world, tmp_path, capsys):
    """--fisher-labels true estimates with labels drawn from the model (K seeded draws): a different
    Fisher from the empirical one, cached under its own key; the flags are refused without data."""
    from sstmerge.fisher import FisherResult
    from sstmerge.merge.__main__ import main

    root, base, u, s = chat_world
    sd, ud = tmp_path / "s.jsonl", tmp_path / "u.jsonl"
    sd.write_text("".join(json.dumps(r) + "\n" for r in SAFETY))
    ud.write_text("".join(json.dumps(r) + "\n" for r in UTILITY))
    common = ["--method", "fisher_avg", "--base", str(base), "--utility", str(u), "--safety", str(s), "--alpha", "1",
              "--safety-data", str(sd), "--utility-data", str(ud), "--backend", "torch", "--no-progress"]
    fc = {}
    for labels in ("empirical", "true"):
        fc[labels] = tmp_path / f"fc-{labels}"
        extra = ["--fisher-labels", "true", "--fisher-samples", "2"] if labels == "true" else []
        code = cli_main(main, common + ["--out", str(tmp_path / f"o-{labels}"), "--fisher-cache", str(fc[labels])] + extra)
        assert code == 0, capsys.readouterr().err
    emp = FisherResult.load(fc["empirical"] / "safety.diag_pool.safetensors")
    tru = FisherResult.load(fc["true"] / "safety.diag_pool.safetensors")
    assert json.loads(tru.meta["options"])["fisher"] == "true" and json.loads(tru.meta["options"])["samples"] == 2
    assert json.loads(emp.meta["options"])["fisher"] == "empirical"
    assert tru.meta["sstmerge.merge.key"] != emp.meta["sstmerge.merge.key"]
    assert any(not torch.equal(tru.tensors[k], emp.tensors[k]) for k in emp.tensors)
    capsys.readouterr()
    for bad in (["--fisher-samples", "2"], ["--fisher-labels", "true", "--fisher-samples", "0"]):
        code = cli_main(main, common + ["--out", str(tmp_path / "bad")] + bad)
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and "--fisher-samples" in err[0] and not (tmp_path / "bad").exists()
    no_data = [a for a in common if a not in ("--safety-data", str(sd), "--utility-data", str(ud))]
    code = cli_main(main, no_data + ["--out", str(tmp_path / "bad"), "--fisher-labels", "true"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--fisher-labels" in err[0]


def _saved(path, layers, base):
    path.mkdir()
    ad.save_adapter(path, layers, base_model=str(base))
    return path


def test_fisher_at_base_and_merged_are_the_fisher_of_those_models(chat_world):
    """diag@base equals the diag Fisher at an adapter with a zero update (the base model itself);
    diag@merged equals the one at an adapter whose update is dU + dS (rank 4: [B_U, B_S] [A_U; A_S])."""
    from sstmerge.merge.fisher_inputs import compute

    root, base, u, s = chat_world
    U, S = ad.load_adapter(u), ad.load_adapter(s)
    zero = _saved(root / "zero", {n: (torch.zeros_like(f.B), f.A, f.scale) for n, f in S.layers.items()}, base)
    both = _saved(root / "both", {n: (torch.cat([U.layers[n].scale * U.layers[n].B, f.scale * f.B], 1),
                                      torch.cat([U.layers[n].A, f.A], 0), 1.0) for n, f in S.layers.items()}, base)
    kw = dict(safety_rows=SAFETY, utility_rows=UTILITY, backend="torch")
    got = compute(str(base), u, s, [("safety", "diag@base"), ("safety", "diag@merged")], **kw)
    at_base = compute(str(base), zero, zero, [("safety", "diag")], **kw).results[("safety", "diag")]
    at_both = compute(str(base), both, both, [("safety", "diag")], **kw).results[("safety", "diag")]
    for name, want in at_base.tensors.items():
        assert torch.allclose(got.results[("safety", "diag@base")].tensors[name], want, rtol=1e-5, atol=0), name
    for name, want in at_both.tensors.items():
        # the merged point adds dU + dS to the fp32 base weights: one rounding per weight
        assert torch.allclose(got.results[("safety", "diag@merged")].tensors[name], want, rtol=1e-3,
                              atol=1e-6 * float(want.abs().max())), name
    assert not torch.allclose(got.results[("safety", "diag@base")].tensors[name],
                              got.results[("safety", "diag@merged")].tensors[name])


def test_sst_and_fisher_avg_read_the_fisher_at_the_point_they_ask_for(chat_world):
    root, base, u, s = chat_world
    opts = {"sst": {"fisher_at": "base"}, "fisher_avg": {"fisher_at": "merged"}}
    assert needs(["sst", "fisher_avg"], opts) == sorted(
        {(r, k) for r in ("utility", "safety") for k in ("diag_sub@base", "diag_pool@merged")})
    fi = fisher_inputs(["sst", "fisher_avg"], str(base), u, s, safety_rows=SAFETY, utility_rows=UTILITY,
                       backend="torch", options=opts)
    a = merge("sst", base, u, s, alpha=1.0, fisher=fi, fisher_at="base")
    assert merge("sst", base, u, s, alpha=1.0, fisher=fi).diagnostics["summary"]["fisher_at"] == "base"  # the default
    from sstmerge.errors import InputError

    with pytest.raises(InputError, match="needs the diag_sub Fisher"):
        merge("sst", base, u, s, alpha=1.0, fisher=fi, fisher_at="own")  # the own-point Fisher was not computed
    own = fisher_inputs(["sst"], str(base), u, s, safety_rows=SAFETY, utility_rows=UTILITY, backend="torch",
                        options={"sst": {"fisher_at": "own"}})
    b = merge("sst", base, u, s, alpha=1.0, fisher=own, fisher_at="own")
    assert any(not torch.allclose(a.layers[n].delta(), b.layers[n].delta()) for n in a.layers)
    assert needs(["sst"], {"sst": {"curvature": "kfac"}}) == [("safety", "kfac"), ("utility", "kfac")]  # own point
    merge("fisher_avg", base, u, s, alpha=1.0, fisher=fi, fisher_at="merged")

    with pytest.raises(InputError, match="needs curvature='diag'"):
        needs(["sst"], {"sst": {"fisher_at": "base", "curvature": "kfac"}})
    with pytest.raises(InputError, match="fisher_at must be one of"):
        needs(["sst"], {"sst": {"fisher_at": "there"}})


def test_fisher_key_follows_the_tensor_bytes_not_a_sum():
    """Equal results give equal keys under any thread count; a change in one element (even one that
    keeps a sum) changes the key."""
    from sstmerge.merge.fisher_inputs import _results_key

    g = torch.Generator().manual_seed(0)
    t = torch.rand(300_000, generator=g)
    keys = set()
    for n in (1, 2):
        torch.set_num_threads(n)
        keys.add(_results_key({("safety", "diag"): {"tensors": {"w": t.clone()}}}))
    assert len(keys) == 1
    swapped = t.clone()
    swapped[[0, 1]] = swapped[[1, 0]]  # the same sum, other bytes
    assert _results_key({("safety", "diag"): {"tensors": {"w": swapped}}}) not in keys
