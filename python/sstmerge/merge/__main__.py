"""Command line: ``python -m sstmerge.merge --method sst --base MODEL --utility DIR --safety DIR
--alpha A --out DIR [--fisher DIR | --safety-data F --utility-data F [--fisher-labels true
[--fisher-samples K]]] [--dense] [--config file.yaml]``.

Method options are given as ``--option key=value`` (repeatable; values parsed as YAML scalars), or
with their own flags (``--density``, ``--rule`` ...), or under ``options:`` in the YAML config,
whose other keys are the long flags with ``_`` for ``-``. Command-line flags override the config.
Bad input: one line on stderr, exit status 2, no output directory.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from ..errors import CliParser, InputError, cli_main

def _rank(v: str):
    """--rank: an int, or 'auto' / 'full' (dense-delta methods; see sstmerge.merge.dense)."""
    return v if v in ("auto", "full") else int(v)


_OPTION_FLAGS = {  # flag -> (option name, type)
    "density": float, "lam": float, "variant": str, "eps": float, "rank": _rank, "offdiag": float,
    "threshold": float, "align_rank": int, "align_model": str, "align_base": str, "rule": str,
    "curvature": str, "gamma": float, "topk": int, "utility_weight": float, "fisher_at": str,
}
_KEYS = ("method", "base", "utility", "safety", "alpha", "out", "fisher", "safety_data", "utility_data", "dense",
         "seed", "backend", "batch_size", "fisher_cache", "fisher_labels", "fisher_samples", "options")


def _parser() -> argparse.ArgumentParser:
    from . import METHODS

    p = CliParser(prog="python -m sstmerge.merge", description=__doc__.split("\n\n")[0],
                  formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML file with the same keys (method, base, utility, safety, alpha, out, ..., options: {...})")
    p.add_argument("--method", choices=sorted(METHODS))
    p.add_argument("--base", help="base model directory (or a name in the local Hugging Face cache)")
    p.add_argument("--utility", help="utility (task) LoRA adapter directory")
    p.add_argument("--safety", help="safety LoRA adapter directory")
    p.add_argument("--alpha", type=float, help="strength of the safety contribution (0 = the utility model)")
    p.add_argument("--out", help="output directory (peft adapter + diagnostics.json + merge.json)")
    p.add_argument("--fisher", help="directory with {utility,safety}.{diag,subspace,kfac}.safetensors")
    p.add_argument("--safety-data", help="JSONL chat rows to estimate the safety Fisher")
    p.add_argument("--utility-data", help="JSONL chat rows to estimate the utility Fisher")
    p.add_argument("--fisher-cache", help="where to keep estimated Fisher files (default: not kept)")
    p.add_argument("--batch-size", type=int, help="batch size of Fisher estimation (default 8)")
    p.add_argument("--fisher-labels", choices=["empirical", "true"],
                   help="Fisher estimation labels: the data's (empirical, default) or drawn from the model (true)")
    p.add_argument("--fisher-samples", type=int,
                   help="label draws per position for --fisher-labels true (default 1)")
    p.add_argument("--dense", action="store_true", default=None, help="also write the fused model to OUT/fused")
    p.add_argument("--seed", type=int, help="seed (DARE masks, randomized SVD); default 0")
    p.add_argument("--backend", help="kernel backend for lora_merge_ / Fisher (auto, torch, cpp, cuda, triton)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="a method option")
    for name, typ in _OPTION_FLAGS.items():
        p.add_argument(f"--{name.replace('_', '-')}", dest=f"opt_{name}", type=typ, help=f"method option {name}")
    return p


def _read_rows(path: str, what: str) -> list[dict]:
    from ..data.files import read_rows

    rows = read_rows(path)
    if not rows:
        raise InputError(f"{what} {path} holds no rows")
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    import yaml

    from . import merge

    args = _parser().parse_args(argv)
    cfg: dict = {}
    if args.config:
        try:
            cfg = yaml.safe_load(Path(args.config).read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise InputError(f"config file {args.config} does not exist") from None
        except yaml.YAMLError as e:
            raise InputError(f"config file {args.config} is not valid YAML ({' '.join(str(e).split())})") from None
        if not isinstance(cfg, dict):
            raise InputError(f"config file {args.config} must hold a mapping of keys")
        cfg = {str(k).replace("-", "_"): v for k, v in cfg.items()}
        bad = sorted(set(cfg) - set(_KEYS))
        if bad:
            raise InputError(f"config file {args.config}: unknown key(s) {', '.join(bad)}; allowed: {', '.join(_KEYS)}")
    val = {k: cfg.get(k) for k in _KEYS}
    for k in _KEYS:
        v = getattr(args, k, None)
        if v is not None:
            val[k] = v
    options = dict(cfg.get("options") or {})
    for item in args.option:
        if "=" not in item:
            raise InputError(f"--option {item!r} must be KEY=VALUE")
        k, v = item.split("=", 1)
        options[k.strip().replace("-", "_")] = yaml.safe_load(v)
    for name in _OPTION_FLAGS:
        v = getattr(args, f"opt_{name}")
        if v is not None:
            options[name] = v
    for k in ("method", "base", "utility", "safety", "alpha", "out"):
        if val[k] is None:
            raise InputError(f"--{k} is required (on the command line or in --config)")
    from ..worlds import resolve_model  # a world name ("tiny") -> its base model dir

    val["base"] = resolve_model(val["base"])
    if val["fisher"] and (val["safety_data"] or val["utility_data"]):
        raise InputError("give either --fisher DIR or --safety-data/--utility-data, not both")
    if bool(val["safety_data"]) != bool(val["utility_data"]):
        raise InputError("--safety-data and --utility-data go together")
    labels, samples = val["fisher_labels"] or "empirical", val["fisher_samples"]
    if (val["fisher_labels"] or samples is not None) and not val["safety_data"]:
        raise InputError("--fisher-labels/--fisher-samples apply to Fisher estimation: give them with "
                         "--safety-data/--utility-data")
    if labels not in ("empirical", "true"):
        raise InputError(f"fisher_labels must be 'empirical' or 'true', got {labels!r}")
    if samples is not None and (labels != "true" or int(samples) < 1):
        raise InputError("--fisher-samples needs --fisher-labels true and a count >= 1")
    kw = {}
    if val["safety_data"]:
        safety_rows = _read_rows(val["safety_data"], "--safety-data")
        utility_rows = _read_rows(val["utility_data"], "--utility-data")
        from .fisher_inputs import fisher_inputs

        from . import METHODS

        if val["method"] not in METHODS:
            raise InputError(f"unknown merge method {val['method']!r}")
        opts = {**METHODS[val["method"]].defaults, **options}
        val["fisher"] = fisher_inputs(
            [val["method"]], val["base"], val["utility"], val["safety"], safety_rows=safety_rows,
            utility_rows=utility_rows, cache_dir=val["fisher_cache"], backend=val["backend"] or "auto",
            seed=int(val["seed"] or 0), progress=not args.no_progress, options={val["method"]: opts},
            fisher=labels, samples=int(samples or 1),
            **({"batch_size": int(val["batch_size"])} if val["batch_size"] else {}))
    res = merge(val["method"], val["base"], val["utility"], val["safety"], alpha=val["alpha"], fisher=val["fisher"],
                out=val["out"], dense=bool(val["dense"]), seed=int(val["seed"] or 0), backend=val["backend"] or "auto",
                progress=not args.no_progress, **options, **kw)
    ranks = [f.rank for f in res.layers.values()]
    print(f"{res.method} alpha={res.alpha:g}: {len(ranks)} layers, rank {min(ranks)}-{max(ranks)} -> {res.out}"
          + (" (+ fused/)" if val["dense"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(main))
