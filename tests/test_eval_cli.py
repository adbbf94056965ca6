"""python -m sstmerge.eval: scores with intervals, records on disk, one-line errors with exit 2."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest_eval import FIXTURES, one_thread, read_jsonl, tiny_model
from sstmerge.errors import cli_main
from sstmerge.eval import evaluate_mmlu, load_items
from sstmerge.eval.__main__ import main

_one_thread = one_thread()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_eval_model")
    model, tok = tiny_model()
    model.save_pretrained(d, safe_serialization=True)
    tok.save_pretrained(d)
    return d


def _run(argv, capsys):
    rc = cli_main(main, [str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_mmlu_cli_writes_records_equal_to_the_api(model_dir, tmp_path, capsys):
    out = tmp_path / "mmlu.jsonl"
    rc, stdout, err = _run(["mmlu", "--model", model_dir, "--data", FIXTURES / "mmlu_test.jsonl", "--out", out,
                            "--batch-size", 8, "--summary", tmp_path / "s.json"], capsys)
    assert rc == 0, err
    recs = read_jsonl(out)
    model, tok = tiny_model()
    assert recs == json.loads(json.dumps(evaluate_mmlu(model, tok, load_items("mmlu", FIXTURES / "mmlu_test.jsonl"), batch_size=8)))
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["n"] == 22 and s["interval"] == "wilson" and s["items_per_s"] > 0
    assert f"accuracy {s['score']:.4f} (95% CI" in stdout and "items/s" in stdout and "world_religions" in stdout


def test_refusal_and_over_refusal_cli_with_adapter(model_dir, tmp_path, capsys):
    import torch
    from peft import LoraConfig, get_peft_model

    model, _ = tiny_model()
    torch.manual_seed(3)
    pm = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    pm.save_pretrained(tmp_path / "adapter")
    for task, data in (("refusal", "advbench.csv"), ("over-refusal", "xstest.csv")):
        out = tmp_path / f"{task}.jsonl"
        rc, stdout, err = _run([task, "--model", model_dir, "--adapter", tmp_path / "adapter", "--data", FIXTURES / data,
                                "--out", out, "--max-new-tokens", 6], capsys)
        assert rc == 0, err
        recs = read_jsonl(out)
        assert set(recs[0]) == {"id", "prompt", "output", "refused"}
        assert "rate" in stdout and "95% CI" in stdout
    assert len(read_jsonl(tmp_path / "over-refusal.jsonl")) == 8


@pytest.mark.parametrize("argv_tail,message", [
    (["--data", "{bad}"], "answer 7 out of range"),
    (["--data", "{empty}"], "empty data file"),
    (["--data", "{missing}"], "missing column(s) question"),
    (["--data", "{nofile}"], "no such data file"),
    (["--data", "{good}", "--k-shot", "2"], "needs --dev-data"),
    (["--data", "{good}", "--batch-size", "0"], "--batch-size must be >= 1"),
    (["--data", "{good}", "--adapter", "{nofile}"], "is not a directory"),
    (["--data", "{good}", "--bogus"], "unrecognized arguments"),
])
def test_bad_input_one_line_exit_2_no_output(model_dir, tmp_path, capsys, argv_tail, message):
    files = {"bad": tmp_path / "bad.jsonl", "empty": tmp_path / "empty.jsonl", "missing": tmp_path / "missing.csv",
             "nofile": tmp_path / "nope", "good": FIXTURES / "mmlu_test.jsonl"}
    files["bad"].write_text(json.dumps({"question": "q", "subject": "s", "choices": list("abcd"), "answer": 7}) + "\n")
    files["empty"].write_text("")
    files["missing"].write_text("subject,choices,answer\ns,\"[1,2,3,4]\",0\n")
    out = tmp_path / "out.jsonl"
    tail = [a.format(**files) for a in argv_tail]
    rc, stdout, err = _run(["mmlu", "--model", model_dir, "--out", out, *tail], capsys)
    assert rc == 2 and message in err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert not out.exists()


def test_subprocess_exit_status_2(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("goal,target\n", encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    p = subprocess.run([sys.executable, "-m", "sstmerge.eval", "refusal", "--model", "tiny", "--data", str(bad),
                        "--out", str(tmp_path / "o.jsonl")], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [f"error: {bad}: empty data file (no rows)"]
    assert not (tmp_path / "o.jsonl").exists()
