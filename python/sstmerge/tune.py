"""sstmerge.tune: every method's options and α chosen on a world's dev items, one budget for all.

    python -m sstmerge.tune                                   # tiny world -> runs/tune-tiny/
    python -m sstmerge.tune --model smollm2-135m --trials 2 --alphas 0.5 1 2
    python -m sstmerge.exp1 --tuned runs/tune-tiny/tuned.json # the test report with these choices

**Budget.** Every method gets the first ``--trials`` option sets of its grid (:data:`GRID`, its
defaults first) at every α of the sweep: the same number of evaluated points per method, SST
included. The items are the world's dev split (its own prompt templates and MMLU items, disjoint
from the test split that exp1 reports).

**Criterion.** A point's dev score is

    score = refusal − over-refusal + MMLU          (rates in [0, 1]; higher is better)

one refusal point is worth one MMLU point, and a benign prompt refused costs as much as a harmful
one answered. Each method's choice is its highest-scoring (option set, α); ties go to the earlier
trial, then the smaller α. The choice is a maximum over the grid on dev, so its dev score is
optimistic; exp1 re-measures it on test, where it took no part in the choice.

Outputs in ``--out`` (default ``runs/tune-<model>``): ``tuned.json`` (the choices, every trial's
dev numbers, the input hashes exp1 checks, provenance) and ``tune.md`` (the tables docs cite).
Merges and evaluations are cached there like exp1's stages: an interrupted run resumes.

**Across worlds.** ``python -m sstmerge.tune --across A/tuned.json B/tuned.json`` prints, for every
method and trial, its best dev score on each world and their mean: a method's default is the trial
with the highest mean (one choice for every world, made on dev items only).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Sequence

from . import exp1, io
from .report import options_text
from .errors import CliParser, InputError, cli_main

#: Option sets tried per method, in order (the first --trials of each; the defaults first). Each
#: varies what its paper tunes: TIES/DARE density, the Safe LoRA/SafeMERGE similarity threshold,
#: RegMean's off-diagonal scale, task arithmetic's utility weight; for the two Fisher methods (SST,
#: Fisher averaging) also where the Fisher is taken (each adapter's model, the base, base+U+S), and
#: for SST its rule (soft; hard, each direction taken whole from the side whose αλ passes the threshold;
#: or the additive safety-subspace rule with k directions per layer).
GRID: dict[str, list[dict]] = {
    "sst": [{}, {"fisher_at": "own"}, {"fisher_at": "merged"}, {"rule": "additive", "topk": 16},
            {"rule": "hard"}, {"rule": "additive", "topk": 64}],
    "task_arithmetic": [{}, {"utility_weight": 0.8}, {"utility_weight": 1.2}, {"utility_weight": 0.6},
                        {"utility_weight": 1.4}, {"utility_weight": 0.4}],
    "ties": [{}, {"density": 0.1}, {"density": 0.4}, {"density": 0.7}, {"density": 0.05}, {"density": 0.9}],
    "dare": [{}, {"density": 0.3}, {"density": 0.7}, {"density": 0.9}, {"density": 0.1}, {"variant": "ties"}],
    "safe_lora": [{}, {"threshold": 0.3}, {"threshold": 0.1}, {"threshold": 0.05}, {"threshold": 0.2},
                  {"threshold": 0.7}],
    "safemerge": [{}, {"threshold": 0.3}, {"threshold": 0.1}, {"threshold": 0.05}, {"threshold": 0.2},
                  {"threshold": 0.7}],
    "safe_lora_adapter": [{}, {"threshold": 0.3}, {"threshold": 0.1}, {"threshold": 0.05}, {"threshold": 0.2},
                          {"threshold": 0.7}],
    "safemerge_adapter": [{}, {"threshold": 0.3}, {"threshold": 0.1}, {"threshold": 0.05}, {"threshold": 0.2},
                          {"threshold": 0.7}],
    "fisher_avg": [{}, {"fisher_at": "base"}, {"fisher_at": "merged"}, {"eps": 1e-2},
                   {"eps": 1e-2, "fisher_at": "base"}, {"eps": 1e-2, "fisher_at": "merged"}],
    "regmean": [{}, {"offdiag": 0.5}, {"offdiag": 0.1}, {"offdiag": 0.9}, {"offdiag": 0.0}, {"eps": 1e-2}],
}
MAX_TRIALS = min(len(g) for g in GRID.values())
DEFAULT_TRIALS = 6
CRITERION = "refusal - over_refusal + MMLU (dev rates); ties: earlier trial, then smaller alpha"


def score(point: dict) -> float:
    """The dev score of one point (module docstring)."""
    return point["refusal"] - point["over_refusal"] + point["mmlu"]


def _rates(records: dict) -> dict:
    def mean(rows, field):
        return sum(bool(r[field]) for r in rows) / len(rows)

    return {"refusal": mean(records["safety"], "refused"), "over_refusal": mean(records["over_refusal"], "refused"),
            "mmlu": mean(records["utility"], "correct"), "n": {p: len(records[p]) for p in exp1.RECORD_PARTS}}


def choose(trials: list[dict]) -> dict:
    """The highest-scoring point of one method's trials (each ``{"trial", "options", "points": [{alpha, ...}]}``),
    ties to the earlier trial, then the smaller α."""
    best = None
    for t in trials:
        for p in sorted(t["points"], key=lambda p: p["alpha"]):
            if best is None or score(p) > best[0]:
                best = (score(p), t, p)
    if best is None:
        raise InputError("tune: a method has no evaluated point")
    s, t, p = best
    return {"trial": t["trial"], "options": t["options"], "alpha": p["alpha"], "dev": p, "score": s}


def _parser() -> argparse.ArgumentParser:
    from .merge import DEFAULT_ALPHAS, DEFAULT_METHODS, METHODS

    p = CliParser(prog="python -m sstmerge.tune",
                  description="Choose every method's options and α on a world's dev items, with one budget for all.")
    p.add_argument("--model", default="tiny", help="a package world: tiny | smollm2-135m")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=list(METHODS), metavar="METHOD",
                   help=f"methods to tune (default: {', '.join(DEFAULT_METHODS)}); sst is always included")
    p.add_argument("--trials", type=int, default=DEFAULT_TRIALS,
                   help=f"option sets per method, the same for every method (1-{MAX_TRIALS}; default {DEFAULT_TRIALS})")
    p.add_argument("--alphas", nargs="+", type=float, help=f"α sweep (default {' '.join(map(str, DEFAULT_ALPHAS))})")
    p.add_argument("--quick", action="store_true", help="the world's quick build and item counts (for tests)")
    p.add_argument("--out", help="output directory (default runs/tune-<model>[-quick])")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, help="evaluation batch size (default: the world's)")
    p.add_argument("--backend", default="auto", help="kernel backend for Fisher and fused merges")
    p.add_argument("--align-model", metavar="DIR", help="as exp1's: an aligned model for Safe LoRA / SafeMERGE")
    p.add_argument("--align-base", metavar="DIR", help="as exp1's: the unaligned model of that pair")
    p.add_argument("--across", nargs="+", metavar="TUNED_JSON",
                   help="instead of tuning: print every trial's best dev score on each world's tuned.json and "
                        "their mean (how a default is chosen across worlds)")
    return p


def _exp1_config(args) -> exp1.Config:
    """exp1's configuration of the same run on the dev split (its validation and the world's defaults)."""
    from . import worlds

    if args.model not in worlds.WORLDS:
        raise InputError(f"tune runs on a package world's dev split ({', '.join(worlds.WORLDS)}); got --model "
                         f"{args.model}. For your own model, pass dev items to exp1 with --harmful-data/--benign-data/"
                         "--mmlu-data and compare its runs")
    if not 1 <= args.trials <= MAX_TRIALS:
        raise InputError(f"--trials must be 1-{MAX_TRIALS} (every method's grid has {MAX_TRIALS}), got {args.trials}")
    argv = ["--model", args.model, "--split", "dev", "--seed", str(args.seed), "--backend", args.backend,
            "--methods", *args.methods]
    argv += ["--alphas", *map(str, args.alphas)] if args.alphas else []
    argv += ["--batch-size", str(args.batch_size)] if args.batch_size else []
    argv += ["--quick"] if args.quick else []
    argv += ["--align-model", args.align_model] if args.align_model else []
    argv += ["--align-base", args.align_base] if args.align_base else []
    return exp1._config(exp1._parser().parse_args(argv))


def run(cfg: exp1.Config, trials: int, out_dir: Path, log=print) -> dict:
    from tqdm.auto import tqdm

    from .merge import default_options
    from .merge.fisher_inputs import compute, needs

    t0 = time.perf_counter()
    source = {"git_commit": exp1._git_commit(), "git_dirty": exp1._git_dirty()}  # read as the run starts, not at its end
    (out_dir / "tuned.json").unlink(missing_ok=True)  # an earlier run's choice must not outlive a failing one
    prep = exp1.prepare(cfg, log)
    out_dir.mkdir(parents=True, exist_ok=True)
    cache = exp1.Cache(out_dir, log)
    # each trial: the method's defaults, the command line's options (the alignment pair), the trial's
    fixed = {m: cfg.options.get(m, {}) for m in cfg.methods}
    grid = {m: [{**default_options(m), **fixed[m], **o} for o in GRID[m][:trials]] for m in cfg.methods}
    pairs = sorted({p for m, sets in grid.items() for o in sets for p in needs([m], {m: o})})
    fisher = compute(prep.base, prep.utility, prep.safety, pairs, safety_rows=prep.safety_rows,
                     utility_rows=prep.utility_rows, cache_dir=out_dir / "fisher", backend=cfg.backend,
                     seed=cfg.seed, progress=True) if pairs else None
    adapters: dict[str, str | None] = {"ref_base": None, "ref_utility": prep.utility, "ref_safety": prep.safety}
    for m, sets in tqdm(grid.items(), desc="merge", unit="method"):
        for i, opts in enumerate(sets):
            for key, (path, _diag) in exp1.merge_points(cfg, prep, fisher, m, opts, cfg.alphas, cache,
                                                        tag=f"{m}_t{i}").items():
                adapters[key] = path
    evals = exp1.evaluate_models(cfg, prep, adapters, cache, log)
    table = {}
    for m, sets in grid.items():
        table[m] = [{"trial": i, "options": {**fixed[m], **GRID[m][i]},
                     "points": [{"alpha": a, **_rates(evals[exp1._point_key(f"{m}_t{i}", a)])} for a in cfg.alphas]}
                    for i, o in enumerate(sets)]
    doc = {
        "model": cfg.model, "split": cfg.split, "quick": cfg.quick, "criterion": CRITERION, "trials": trials,
        "alphas": cfg.alphas, "items": {"harmful": len(prep.harmful), "benign": len(prep.benign), "mmlu": len(prep.mmlu)},
        "hashes": prep.hashes,
        "references": {k: _rates(evals[k]) for k in ("ref_base", "ref_utility", "ref_safety")},
        "methods": {m: choose(rows) for m, rows in table.items()},
        "table": table,
        "provenance": {**exp1._versions(), **source, "seed": cfg.seed,
                       "seconds": round(time.perf_counter() - t0, 1), "out_dir": str(out_dir)},
    }
    io.write_text(out_dir / "tune.md", markdown(doc))
    io.write_json(out_dir / "tuned.json", doc)  # last: its presence means the run completed
    return doc


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def markdown(doc: dict) -> str:
    """tune.md: the choices, then every trial at every α (dev rates, %)."""
    n = doc["items"]
    L = [f"# sstmerge.tune: {doc['model']}, dev split", "",
         f"Items: {n['harmful']} harmful, {n['benign']} benign, {n['mmlu']} MMLU (dev). Budget: {doc['trials']} "
         f"option sets per method × α ∈ {{{', '.join(f'{a:g}' for a in doc['alphas'])}}}. Criterion: {doc['criterion']}. "
         f"CPU: {doc['provenance']['cpu']}.", "",
         "| reference | refusal | over-refusal | MMLU |", "|---|---:|---:|---:|"]
    for k, r in doc["references"].items():
        L.append(f"| {k.removeprefix('ref_')} | {_pct(r['refusal'])} | {_pct(r['over_refusal'])} | {_pct(r['mmlu'])} |")
    L += ["", "## Chosen on dev", "", "| method | options | α | refusal | over-refusal | MMLU | score |",
          "|---|---|---:|---:|---:|---:|---:|"]
    for m, c in doc["methods"].items():
        d = c["dev"]
        L.append(f"| {m} | {options_text(c['options'])} | {c['alpha']:g} | {_pct(d['refusal'])} | {_pct(d['over_refusal'])} | "
                 f"{_pct(d['mmlu'])} | {c['score']:.3f} |")
    L += ["", "## Every trial (refusal / over-refusal / MMLU, %)", "",
          "| method | options | " + " | ".join(f"α={a:g}" for a in doc["alphas"]) + " |",
          "|---|---|" + "---|" * len(doc["alphas"])]
    for m, rows in doc["table"].items():
        for t in rows:
            cells = [f"{_pct(p['refusal'])} / {_pct(p['over_refusal'])} / {_pct(p['mmlu'])}" for p in t["points"]]
            L.append(f"| {m} | {options_text(t['options'])} | " + " | ".join(cells) + " |")
    L += ["", f"Made by `python -m sstmerge.tune --model {doc['model']} --trials {doc['trials']} --alphas "
          + " ".join(f"{a:g}" for a in doc["alphas"]) + (" --quick" if doc["quick"] else "") + "` at commit " + str(doc["provenance"]["git_commit"])
          + (" with uncommitted changes" if doc["provenance"].get("git_dirty") else "") + ".", ""]
    return "\n".join(L)


def _grid_options(t: dict) -> dict:
    """A trial's options without the world-specific alignment pair (the paths differ per world)."""
    return {k: v for k, v in t["options"].items() if not k.startswith("align_")}


def _read_tuned(path: str) -> dict:
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"--across: cannot read {path} as a tune run's tuned.json ({e})") from None
    if not isinstance(doc, dict) or "table" not in doc or "model" not in doc:
        raise InputError(f"--across: {path} is not a tuned.json written by python -m sstmerge.tune")
    return doc


def across(docs: Sequence[dict]) -> str:
    """Markdown: every trial's best dev score (over its α) on each world and the mean over worlds.

    A method's default should be the trial with the highest mean: one choice for all worlds, made on
    dev items only. The worlds' tune runs must have tried the same option sets in the same order."""
    if len(docs) < 2:
        raise InputError("--across needs the tuned.json of at least two worlds")
    first = docs[0]["table"]
    for d in docs[1:]:
        if {m: [_grid_options(t) for t in ts] for m, ts in d["table"].items()} != \
                {m: [_grid_options(t) for t in ts] for m, ts in first.items()}:
            raise InputError(f"--across: {d['model']}'s tune run tried other methods or option sets than "
                             f"{docs[0]['model']}'s; rerun both with the same --methods and --trials")
    names = [d["model"] for d in docs]
    L = ["| method | trial options | " + " | ".join(names) + " | mean |", "|---|---|" + "---:|" * (len(names) + 1)]
    for m, trials in first.items():
        rows = []
        for i, t in enumerate(trials):
            best = [choose([d["table"][m][i]]) for d in docs]
            rows.append((sum(b["score"] for b in best) / len(best), options_text(_grid_options(t)), best))
        top = max(r[0] for r in rows)
        for mean, opts, best in rows:
            cells = [f"{b['score']:.3f} (α={b['alpha']:g})" for b in best]
            mark = "**" if mean == top else ""
            L.append(f"| {m} | {opts} | " + " | ".join(cells) + f" | {mark}{mean:.3f}{mark} |")
    return "\n".join(L) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.across:
        given = [k for k, v in vars(args).items() if k != "across" and v != parser.get_default(k)]
        if given:
            raise InputError(f"--across only reads tuned.json files; drop --{given[0].replace('_', '-')}")
        print(across([_read_tuned(p) for p in args.across]), end="")
        return 0
    cfg = _exp1_config(args)
    out = exp1.run_dir(args.out or f"runs/tune-{cfg.model}" + ("-quick" if cfg.quick else ""))
    doc = run(cfg, args.trials, out)
    print(f"done in {doc['provenance']['seconds']:.1f} s: {out / 'tuned.json'}, {out / 'tune.md'}")
    for m, c in doc["methods"].items():
        d = c["dev"]
        print(f"  {m}: {options_text(c['options'])}, α={c['alpha']:g}: refusal {d['refusal']:.3f}, "
              f"over-refusal {d['over_refusal']:.3f}, MMLU {d['mmlu']:.3f} (score {c['score']:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(main))
