"""python -m sstmerge.merge: every method from the command line (with a --fisher directory and a
YAML config), and bad input -> one line on stderr, exit status 2, no output directory."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from sstmerge import adapters as ad
from sstmerge.errors import cli_main
from sstmerge.merge import METHODS
from sstmerge.merge.__main__ import main
from test_merge_world import make_adapter, make_base, make_fisher, world  # noqa: F401  (fixture)


def _fisher_dir(fisher: dict, path):
    from sstmerge.fisher import FisherResult

    path.mkdir(parents=True, exist_ok=True)
    for (role, kind), fr in fisher.items():
        FisherResult(fr.kind, dict(fr.tensors), dict(fr.meta)).save(path / f"{role}.{kind}.safetensors")
    return path


@pytest.fixture(scope="module")
def fisher_dir(world, tmp_path_factory):
    return _fisher_dir(world.fisher, tmp_path_factory.mktemp("fisher"))


def _run(argv, capsys):
    capsys.readouterr()  # drop what building the fixtures printed
    code = cli_main(main, [str(a) for a in argv])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def _common(world, out, method="sst", alpha=1.0):
    return ["--method", method, "--base", world.base, "--utility", world.utility, "--safety", world.safety,
            "--alpha", alpha, "--out", out, "--backend", "torch", "--no-progress"]


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_runs_from_the_cli(world, fisher_dir, tmp_path, capsys, method):
    out = tmp_path / "out"
    pair = [f"--{k.replace('_', '-')}={v}" for k, v in world.options(method).items()]
    code, stdout, err = _run(_common(world, out, method) + ["--fisher", fisher_dir, "--dense", *pair], capsys)
    assert code == 0, err
    assert method in stdout
    a = ad.load_adapter(out)
    assert sorted(a.layers) == sorted(ad.load_adapter(world.utility).layers)
    assert (out / "fused" / "config.json").exists() and list((out / "fused").glob("*.safetensors"))
    diag = json.loads((out / "diagnostics.json").read_text())
    assert diag["method"] == method and diag["alpha"] == 1.0
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(world.base), str(out))


def test_yaml_config_and_option_flags(world, fisher_dir, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"method: sst\nbase: {world.base}\nutility: {world.utility}\nsafety: {world.safety}\nalpha: 2.0\n"
                   f"out: {tmp_path / 'o'}\nfisher: {fisher_dir}\noptions:\n  rule: soft\n  curvature: exact\n")
    code, _, err = _run(["--config", cfg, "--gamma", "0.01", "--no-progress"], capsys)
    assert code == 0, err
    info = json.loads((tmp_path / "o" / "merge.json").read_text())
    assert info["alpha"] == 2.0 and info["options"]["rule"] == "soft" and info["options"]["curvature"] == "exact"
    assert info["options"]["gamma"] == 0.01
    code, _, err = _run(["--config", cfg, "--alpha", "0.5", "--option", "rule=hard", "--no-progress",
                         "--out", tmp_path / "o2"], capsys)
    assert code == 0, err
    info = json.loads((tmp_path / "o2" / "merge.json").read_text())
    assert info["alpha"] == 0.5 and info["options"]["rule"] == "hard"


def _bad(argv, capsys, out, *expect):
    code, _, err = _run(argv, capsys)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for e in expect:
        assert e in lines[0], lines[0]
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]  # no temp left
    return lines[0]


def test_bad_adapters(world, fisher_dir, tmp_path, capsys):
    out = tmp_path / "o"
    other_base = make_base(tmp_path / "b48", hidden=48)
    other = make_adapter(other_base, tmp_path / "other")
    _bad(_common(world, out, "task_arithmetic")[:6] + ["--safety", other, "--alpha", 1, "--out", out], capsys, out,
         "base model")
    targets = make_adapter(world.base, tmp_path / "targets", targets=["q_proj", "k_proj"])
    _bad(["--method", "ties", "--base", world.base, "--utility", world.utility, "--safety", targets, "--alpha", 1,
          "--out", out], capsys, out, "different modules")
    # an adapter pair that matches itself but not the base model
    other2 = make_adapter(other_base, tmp_path / "other2", seed=4)
    _bad(["--method", "task_arithmetic", "--base", world.base, "--utility", other, "--safety", other2, "--alpha", 1,
          "--out", out], capsys, out, "another base model")
    missing = tmp_path / "missing"
    shutil.copytree(world.safety, missing)
    (missing / "adapter_model.safetensors").unlink()
    _bad(_common(world, out, "dare")[:6] + ["--safety", missing, "--alpha", 1, "--out", out], capsys, out, "missing")
    corrupt = tmp_path / "corrupt"
    shutil.copytree(world.safety, corrupt)
    w = corrupt / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[: len(w.read_bytes()) // 2])
    _bad(_common(world, out, "safe_lora")[:6] + ["--safety", corrupt, "--alpha", 1, "--out", out], capsys, out,
         "not a valid safetensors file")
    _bad(["--method", "sst", "--base", tmp_path / "nobase", "--utility", world.utility, "--safety", world.safety,
          "--alpha", 1, "--out", out], capsys, out, "nobase")


def test_bad_fisher_and_arguments(world, fisher_dir, tmp_path, capsys):
    out = tmp_path / "o"
    # a Fisher computed for other adapters (another joint subspace) and for another model (other shapes)
    other_s = make_adapter(world.base, tmp_path / "s_other", seed=11)
    foreign = _fisher_dir(make_fisher(world.utility, other_s, world.base), tmp_path / "f_other")
    _bad(_common(world, out, "sst") + ["--curvature", "kfac", "--fisher", foreign], capsys, out, "other adapters or another model")
    _bad(_common(world, out, "regmean") + ["--fisher", foreign], capsys, out, "other adapters or another model")
    b48 = make_base(tmp_path / "b48", hidden=48)
    f48 = _fisher_dir(make_fisher(make_adapter(b48, tmp_path / "u48"), make_adapter(b48, tmp_path / "s48", seed=3), b48),
                      tmp_path / "f48")
    _bad(_common(world, out, "fisher_avg") + ["--fisher", f48], capsys, out, "another model")
    _bad(_common(world, out, "sst") + ["--fisher", f48], capsys, out, "another model")
    # a NaN Fisher, a corrupt Fisher file, no Fisher at all
    nan = {k: v for k, v in world.fisher.items()}
    t = dict(nan[("safety", "kfac")].tensors)
    name = next(k for k in t if k.endswith(".A"))
    t[name] = t[name].clone()
    t[name][0, 0] = float("nan")
    from types import SimpleNamespace

    nan[("safety", "kfac")] = SimpleNamespace(kind="kfac", tensors=t, meta={})
    _bad(_common(world, out, "sst") + ["--curvature", "kfac", "--fisher", _fisher_dir(nan, tmp_path / "fnan")], capsys, out, "NaN")
    bad = tmp_path / "fbad"
    shutil.copytree(fisher_dir, bad)
    f = bad / "utility.kfac.safetensors"
    f.write_bytes(f.read_bytes()[:-64])
    _bad(_common(world, out, "regmean") + ["--fisher", bad], capsys, out, "corrupt")
    _bad(_common(world, out, "sst"), capsys, out, "needs Fisher statistics")
    _bad(_common(world, out, "sst") + ["--fisher", fisher_dir, "--rule", "magic"], capsys, out, "rule must be one of")
    _bad(_common(world, out, "ties") + ["--option", "colour=red"], capsys, out, "unknown option")
    _bad(_common(world, out, "ties", alpha=-1), capsys, out, "alpha")
    _bad(_common(world, out, "nonsense"), capsys, out, "invalid choice")
    _bad(["--method", "ties", "--out", out], capsys, out, "--base is required")


def test_failure_in_a_later_layer_leaves_no_output_and_no_fallback(world, fisher_dir, tmp_path, capsys):
    """A zero Fisher in the last layer stops SST with an error; nothing is written."""
    from types import SimpleNamespace

    f = {}
    for (role, kind), fr in world.fisher.items():
        t = dict(fr.tensors)
        if kind == "kfac":
            last = sorted(k for k in t if k.endswith(".A"))[-1]
            t[last] = torch.zeros_like(t[last])
        f[(role, kind)] = SimpleNamespace(kind=fr.kind, tensors=t, meta={})
    out = tmp_path / "o"
    _bad(_common(world, out, "sst") + ["--curvature", "kfac", "--fisher", _fisher_dir(f, tmp_path / "fz")], capsys, out, "zero", "SST-Merge stops")
    # an existing output directory is left as it was when a run fails
    out.mkdir()
    (out / "keep.txt").write_text("old")
    code, _, _ = _run(_common(world, out, "sst") + ["--curvature", "kfac", "--fisher", tmp_path / "fz"], capsys)
    assert code == 2 and (out / "keep.txt").read_text() == "old"
