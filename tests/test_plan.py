"""`exp1 --plan` (sstmerge.plan): arithmetic from shapes, no weights; and bench/scale_sim.py's quick mode,
whose measured file sizes must match the plan's formulas."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


from sstmerge import plan as pl
from sstmerge.models import SHAPES, shape_from_config

ROOT = Path(__file__).resolve().parents[1]
#: fixed per-layer costs so these tests do not depend on this machine's speed
COSTS = {"n_alphas": 5, **{m: ({"per_entry_s": 1e-8} if m in ("ties", "dare", "fisher_avg") else {"per_layer_s": 0.01})
                            for m in ("sst", "task_arithmetic", "ties", "dare", "safe_lora", "safemerge", "fisher_avg", "regmean")}}


def test_shapes_give_the_registry_models_parameter_counts():
    # published sizes: Mistral-7B-v0.3 7.25B, Llama-3.1-8B 8.03B, Qwen2.5-14B 14.77B, SmolLM2-135M 0.135B
    for name, billions in (("mistral-7b", 7.25), ("llama-3.1-8b", 8.03), ("qwen2.5-14b", 14.77), ("smollm2-135m", 0.1348)):
        got = SHAPES[name].params() / 1e9
        assert abs(got - billions) <= 0.005 * billions, (name, got)  # norms' and biases' share (<0.5 %) aside
    cfg = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2, "vocab_size": 100}
    s = shape_from_config(cfg)
    assert s.projections()["k_proj"] == (32, 64) and s.projections()["down_proj"] == (64, 96)


def test_qwen_plan_sizes_follow_the_formulas():
    p = pl.make_plan("qwen2.5-14b", costs=COSTS)
    s = SHAPES["qwen2.5-14b"]
    per_layer_oi = sum(o + i for o, i in s.projections().values())
    assert p["input_adapters_bytes"] == 2 * 4 * 16 * per_layer_oi * s.layers
    assert max(p["merged_adapter_bytes"].values()) == p["input_adapters_bytes"]  # rank 2r: the inputs' size
    assert 2 * p["merged_adapter_bytes"]["safe_lora"] == p["input_adapters_bytes"]  # P dU alone: rank r
    n = 32 * 32
    assert p["fisher_files"]["diag_sub"] == 4 * (7 * s.layers * n * n + 32 * per_layer_oi * s.layers)
    t = pl.targets(p)
    assert t["Fisher files (GB)"][2] and t["merged adapter / inputs"][2] and t["peak host memory (GB)"][2]
    assert t["peak GPU memory (GB)"][0] > s.params() * 2 / 1e9  # at least the bf16 weights


def _run(*args):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_exp1_plan_cli_prints_the_stages_and_rejects_unknown_models(tmp_path):
    r = _run("-m", "sstmerge.exp1", "--model", "smollm2-135m", "--plan")  # small shapes: a quick calibration
    assert r.returncode == 0, r.stderr
    for word in ("fisher", "merge", "evaluate", "targets", "Fisher files"):
        assert word in r.stdout
    bad = _run("-m", "sstmerge.exp1", "--model", str(tmp_path / "nothing"), "--plan")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


def test_scale_sim_quick_matches_the_plan_on_sizes(tmp_path):
    out = tmp_path / "sim.json"
    r = _run(str(ROOT / "bench" / "scale_sim.py"), "--model", "smollm2-135m", "--layers", "1", "--quick",
             "--json", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    plan = res["plan_sim"]
    # file sizes are exact arithmetic; safetensors adds a JSON header (a few kB per file)
    fisher = sum(res["fisher"]["files"].values())
    assert abs(fisher / (2 * sum(plan["fisher_files"].values())) - 1) <= 0.05
    for m, r_ in res["merge"].items():
        assert r_["max_rank"] <= 2 * res["rank"], m
        assert abs(r_["adapter_bytes"] / plan["merged_adapter_bytes"][m] - 1) <= 0.05, m
    assert "| Fisher files (all) |" in r.stdout
