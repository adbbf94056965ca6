"""sstmerge.tune on the tiny world (--quick): the same budget per method, choices that follow from the
dev records, exp1 --tuned reporting those choices on test, and the refusals of bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sstmerge import exp1, stats, tune


def _run(module, args):
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=900)


def test_choose_takes_the_best_score_ties_to_the_earlier_trial_and_smaller_alpha():
    pt = lambda a, r, o, u: {"alpha": a, "refusal": r, "over_refusal": o, "mmlu": u}  # noqa: E731
    trials = [{"trial": 0, "options": {}, "points": [pt(2.0, 0.5, 0.0, 0.5), pt(1.0, 0.6, 0.1, 0.5)]},
              {"trial": 1, "options": {"x": 1}, "points": [pt(0.5, 0.9, 0.4, 0.5), pt(1.0, 1.0, 0.0, 0.1)]}]
    c = tune.choose(trials)  # every score is 1.0 but trial 1's alpha=1 (1.1)
    assert (c["trial"], c["alpha"], c["score"]) == (1, 1.0, pytest.approx(1.1))
    trials[1]["points"][1] = pt(1.0, 0.5, 0.0, 0.5)  # now all tie at 1.0: trial 0, smaller alpha
    c = tune.choose(trials)
    assert (c["trial"], c["alpha"]) == (0, 1.0)


def test_every_grid_starts_at_the_defaults_and_has_only_the_methods_options():
    from sstmerge.merge import METHODS

    assert set(tune.GRID) == set(METHODS)
    for m, sets in tune.GRID.items():
        assert sets[0] == {} and len(sets) >= tune.MAX_TRIALS
        assert len({json.dumps(o, sort_keys=True) for o in sets}) == len(sets), m  # no trial repeated
        for o in sets:
            assert set(o) <= set(METHODS[m].defaults), (m, o)


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    root = tmp_path_factory.mktemp("tune")
    r = _run("sstmerge.tune", ["--quick", "--methods", "task_arithmetic", "--trials", "2", "--alphas", "1", "2",
                               "--out", str(root / "t")])
    assert r.returncode == 0, r.stdout + r.stderr
    return root


def test_tune_gives_every_method_the_same_budget_and_chooses_from_the_dev_records(tuned):
    out = tuned / "t"
    doc = json.loads((out / "tuned.json").read_text())
    assert doc["split"] == "dev" and set(doc["methods"]) == {"sst", "task_arithmetic"}
    for m, rows in doc["table"].items():
        assert len(rows) == 2 and all(len(t["points"]) == 2 for t in rows), m
        for t in rows:
            for p in t["points"]:  # each point's rates are its per-item dev records
                rec = {part: [json.loads(line) for line in (out / "eval" / f"{m}_t{t['trial']}_a{p['alpha']:g}" /
                                                             f"{part}.jsonl").read_text().splitlines()]
                       for part in exp1.RECORD_PARTS}
                assert p["refusal"] == sum(r["refused"] for r in rec["safety"]) / len(rec["safety"])
                assert p["mmlu"] == sum(r["correct"] for r in rec["utility"]) / len(rec["utility"])
        best = max(tune.score(p) for t in rows for p in t["points"])
        assert doc["methods"][m]["score"] == best
    md = (out / "tune.md").read_text()
    assert "## Chosen on dev" in md and doc["provenance"]["cpu"] in md


def test_exp1_tuned_reports_the_dev_choices_on_test(tuned):
    doc = json.loads((tuned / "t" / "tuned.json").read_text())
    out = tuned / "e"
    r = _run("sstmerge.exp1", ["--quick", "--methods", "task_arithmetic", "--tuned", str(tuned / "t" / "tuned.json"),
                               "--out", str(out)])
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads((out / "results.json").read_text())
    cfg = res["provenance"]["config"]
    assert cfg["split"] == "test" and cfg["options"] == {m: c["options"] for m, c in doc["methods"].items()}
    assert {m: c["alpha"] for m, c in doc["methods"].items()} == cfg["chosen_alpha"]
    assert set(cfg["chosen_alpha"].values()) <= set(cfg["alphas"])
    dc = res["dev_chosen"]
    assert [p["method"] for p in dc["points"]] == ["sst", "task_arithmetic"] and len(dc["verdicts"]) == 1
    # the verdict follows from the per-item test records
    field = {"safety": "refused", "over_refusal": "refused", "utility": "correct"}

    def rec(key):
        return {part: [int(json.loads(line)[f]) for line in (out / "eval" / key / f"{part}.jsonl").read_text().splitlines()]
                for part, f in field.items()}

    a, b = dc["points"]
    comps = [{"a": a, "b": b, "diff": stats.compare(rec(f"sst_a{a['alpha']:g}"), rec(f"task_arithmetic_a{b['alpha']:g}"),
                                                    n_boot=cfg["n_boot"], seed=cfg["seed"])}]
    assert json.loads(json.dumps(stats.dominance(comps))) == dc["verdicts"]
    # one baseline point is its own front: the goal is met exactly when SST dominates it
    assert dc["goal"]["front"] == [{"method": "task_arithmetic", "alpha": b["alpha"]}]
    assert dc["goal"]["met"] == (dc["verdicts"][0]["verdict"] == "a")
    report = (out / "report.md").read_text()
    assert "## Dev-chosen points" in report and "(dev-chosen points)" in report
    # the merged adapters carry the tuned options
    merge_info = json.loads((out / "merged" / f"sst_a{a['alpha']:g}" / "merge.json").read_text())
    for k, v in doc["methods"]["sst"]["options"].items():
        assert merge_info["options"][k] == v


@pytest.mark.parametrize("edit, extra, needle", [
    (lambda d: d.update(split="test"), [], "not dev; tune on dev items only"),
    (lambda d: d.update(model="smollm2-135m"), [], "was tuned for --model 'smollm2-135m'"),
    (lambda d: d["methods"].pop("task_arithmetic"), [], "has no choice for task_arithmetic"),
    (lambda d: d["methods"]["sst"]["options"].update(density=0.3), [], "are not options of sst"),
    (lambda d: d["hashes"].update(utility_adapter="0" * 64), [], "tuned with another utility_adapter"),
    (lambda d: None, ["--split", "dev"], "--tuned reports the test items"),
])
def test_exp1_refuses_a_tune_file_that_does_not_fit_the_run(tuned, tmp_path, edit, extra, needle):
    doc = json.loads((tuned / "t" / "tuned.json").read_text())
    edit(doc)
    f = tmp_path / "tuned.json"
    f.write_text(json.dumps(doc))
    out = tmp_path / "o"
    r = _run("sstmerge.exp1", ["--quick", "--methods", "task_arithmetic", "--tuned", str(f), "--out", str(out), *extra])
    assert r.returncode == 2 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (out / "results.json").exists()


@pytest.mark.parametrize("args, needle", [
    (["--trials", "0"], "--trials must be 1-"),
    (["--trials", "99"], "--trials must be 1-"),
    (["--model", "qwen2.5-14b"], "tune runs on a package world's dev split"),
])
def test_tune_bad_input_is_one_line_exit_2(tmp_path, args, needle):
    r = _run("sstmerge.tune", [*args, "--out", str(tmp_path / "o")])
    assert r.returncode == 2 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "o").exists()


def _doc(model, scores, path="/w"):
    """A tuned.json's table: per method, trials whose single α=1 point has dev score ``s``."""
    pt = lambda s: {"alpha": 1.0, "refusal": s, "over_refusal": 0.0, "mmlu": 0.0}  # noqa: E731
    return {"model": model, "table": {m: [{"trial": i, "options": {**o, "align_model": path}, "points": [pt(s)]}
                                          for i, (o, s) in enumerate(trials)] for m, trials in scores.items()}}


def test_across_averages_each_trials_best_dev_score_over_worlds_and_marks_the_winner():
    a = _doc("tiny", {"sst": [({}, 0.9), ({"rule": "hard"}, 0.5)]}, path="/tiny")
    b = _doc("smol", {"sst": [({}, 0.1), ({"rule": "hard"}, 0.7)]}, path="/smol")  # other pair paths: same grid
    md = tune.across([a, b])
    assert "| sst | defaults | 0.900 (α=1) | 0.100 (α=1) | 0.500 |" in md
    assert "| sst | rule=hard | 0.500 (α=1) | 0.700 (α=1) | **0.600** |" in md
    with pytest.raises(tune.InputError, match="other methods or option sets"):
        tune.across([a, _doc("smol", {"sst": [({}, 0.1), ({"rule": "additive"}, 0.7)]})])
    with pytest.raises(tune.InputError, match="at least two worlds"):
        tune.across([a])


def test_across_cli_reads_tuned_files_and_refuses_a_bad_one(tmp_path):
    for name, s in (("a", 0.2), ("b", 0.4)):
        (tmp_path / f"{name}.json").write_text(json.dumps(_doc(name, {"ties": [({}, s)]})))
    r = _run("sstmerge.tune", ["--across", str(tmp_path / "a.json"), str(tmp_path / "b.json")])
    assert r.returncode == 0 and "| ties | defaults | 0.200 (α=1) | 0.400 (α=1) | **0.300** |" in r.stdout, r.stderr
    (tmp_path / "c.json").write_text("{}")
    r = _run("sstmerge.tune", ["--across", str(tmp_path / "a.json"), str(tmp_path / "c.json")])
    assert r.returncode == 2 and "is not a tuned.json" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = _run("sstmerge.tune", ["--across", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--trials", "2"])
    assert r.returncode == 2 and "drop --trials" in r.stderr and len(r.stderr.strip().splitlines()) == 1
