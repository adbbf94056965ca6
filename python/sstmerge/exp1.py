"""exp1: the Safety Tax experiment, end to end.

    python -m sstmerge.exp1                      # the embedded tiny world, no download
    python -m sstmerge.exp1 --quick --out D      # the same, small enough for tests (< 60 s)
    python -m sstmerge.exp1 --model qwen2.5-14b --utility-adapter U --safety-adapter S

Stages (each caches its output in --out; an interrupted run resumes where it stopped):

  prepare   the base model, the utility adapter U and the safety adapter S (the tiny world is built
            and cached by sstmerge.worlds); the evaluation items (a world's test split, or --split dev
            for tuning), the same for every model.
  fisher    the Fisher statistics the methods need (sstmerge.merge.fisher_inputs -> sstmerge.fisher).
  merge     every method over its α sweep, each written as a peft adapter with its diagnostics.
  evaluate  the baseline (base + U; or the base alone with --baseline base), the reference models and
            every merged model on the same harmful, benign and MMLU items; per-item records as JSONL.
  stats     paired bootstrap intervals, McNemar tests and the Safety Tax (sstmerge.stats).
  report    results.json, report.md and safety_utility.png.

SST-Merge is always part of the run: if it fails in any layer, the run stops with the error and no
results file is written (the research note this project grew from fell back silently instead).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from . import __version__, io, stats, worlds
from .errors import CliParser, InputError, cli_main

STAGES = ("prepare", "fisher", "merge", "evaluate", "stats", "report")
FINAL_OUTPUTS = ("results.json", "report.md", "safety_utility.png")


# ----------------------------------------------------------------------------- configuration


@dataclass
class Config:
    model: str = "tiny"
    utility_adapter: str | None = None
    safety_adapter: str | None = None
    methods: list[str] = field(default_factory=list)
    alphas: list[float] = field(default_factory=list)
    harmful_n: int | None = None
    benign_n: int | None = None
    mmlu_n: int | None = None
    k_shot: int = 0
    baseline: str = "utility"
    quick: bool = False
    split: str = "test"
    seed: int = 0
    batch_size: int = 32
    max_new_tokens: int = 16
    n_boot: int = stats.N_BOOT
    harmful_data: str | None = None
    benign_data: str | None = None
    mmlu_data: str | None = None
    safety_data: str | None = None
    utility_data: str | None = None
    backend: str = "auto"
    #: per-method option overrides and dev-chosen α, from ``--tuned`` (sstmerge.tune's tuned.json)
    options: dict[str, dict] = field(default_factory=dict)
    chosen_alpha: dict[str, float] = field(default_factory=dict)
    tuned: str | None = None
    tuned_hashes: dict[str, str] = field(default_factory=dict)


def _parser() -> argparse.ArgumentParser:
    from .merge import DEFAULT_ALPHAS, DEFAULT_METHODS, METHODS

    p = CliParser(
        prog="python -m sstmerge.exp1",
        description="The Safety Tax experiment: baseline vs SST-Merge and baselines, with paired statistics.",
    )
    p.add_argument("--model", default="tiny",
                   help="tiny (the package's world) | smollm2-135m | mistral-7b | llama-3.1-8b | qwen2.5-14b | PATH")
    p.add_argument("--utility-adapter", help="peft adapter dir of the task (utility) adapter")
    p.add_argument("--safety-adapter", help="peft adapter dir of the safety adapter")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=list(METHODS), metavar="METHOD",
                   help=f"merge methods (default: {', '.join(DEFAULT_METHODS)}; also "
                        f"{', '.join(m for m in METHODS if m not in DEFAULT_METHODS)}); sst is always included")
    p.add_argument("--alphas", nargs="+", type=float, help=f"α sweep (default {' '.join(map(str, DEFAULT_ALPHAS))})")
    p.add_argument("--harmful-n", type=int, help="harmful prompts to evaluate (default: all held-out)")
    p.add_argument("--benign-n", type=int, help="benign look-alike prompts to evaluate (default: all)")
    p.add_argument("--mmlu-n", type=int, help="MMLU questions to evaluate (default: all)")
    p.add_argument("--k-shot", type=int, default=0, help="MMLU few-shot examples from the dev split")
    p.add_argument("--baseline", choices=("utility", "base"), default="utility",
                   help="baseline model: base + utility adapter (default) or the base alone")
    p.add_argument("--harmful-data", help="harmful prompts file (AdvBench/HarmBench columns); replaces a world's own")
    p.add_argument("--benign-data", help="benign look-alike prompts file (XSTest columns); replaces a world's own")
    p.add_argument("--mmlu-data", help="MMLU test file (cais/mmlu columns); replaces a world's own")
    p.add_argument("--safety-data", help="safety data (chat JSONL) for the Fisher estimates; replaces a world's own")
    p.add_argument("--utility-data", help="utility data (chat and/or MMLU JSONL) for the Fisher estimates; "
                                          "replaces a world's own")
    p.add_argument("--split", choices=("test", "dev"), default="test",
                   help="a world's items to evaluate: test (reports) or dev (tuning; disjoint templates)")
    p.add_argument("--quick", action="store_true", help="a world, small (fewer items and α; the world's QUICK): tiny < 60 s, smollm2-135m < 5 min")
    p.add_argument("--out", help="run directory (default runs/exp1-<model>[-quick])")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, help="evaluation batch size (default: the world's, else 32)")
    p.add_argument("--max-new-tokens", type=int,
                   help="reply tokens generated for refusal detection (default: the world's, else 16)")
    p.add_argument("--n-boot", type=int, default=stats.N_BOOT, help="bootstrap resamples")
    p.add_argument("--backend", default="auto", help="kernel backend for Fisher and fused merges")
    p.add_argument("--align-model", metavar="DIR",
                   help="an aligned model whose difference from --align-base gives Safe LoRA's and SafeMERGE's "
                        "alignment subspace (default: a world's aligned twin; for a registry model, the model itself)")
    p.add_argument("--align-base", metavar="DIR",
                   help="the unaligned model of that pair (default: the base model; for a registry model given "
                        "without --align-model, its pretrained-only model)")
    p.add_argument("--tuned", metavar="TUNED_JSON",
                   help="every method's options and α chosen on dev by `python -m sstmerge.tune` (its tuned.json); "
                        "the report then compares the dev-chosen points")
    p.add_argument("--stop-after", choices=STAGES[:-1], help="stop after this stage (resume later)")
    p.add_argument("--plan", action="store_true",
                   help="print each stage's estimated GPU/host memory, disk and time (no weights loaded), then exit")
    return p


def _config(args: argparse.Namespace) -> Config:
    from .merge import DEFAULT_ALPHAS, QUICK_ALPHAS

    methods = list(dict.fromkeys(["sst", *args.methods]))
    world = is_world(args.model, args.utility_adapter, args.safety_adapter)
    if args.quick and not world:
        raise InputError(f"--quick runs a package world ({', '.join(worlds.WORLDS)}); drop --quick or the adapters")
    quick = getattr(worlds.module(args.model), "QUICK", {}) if args.quick else {}
    alphas = args.alphas or list(quick.get("alphas", QUICK_ALPHAS) if args.quick else DEFAULT_ALPHAS)
    if any(not (0.0 <= a <= 4.0) for a in alphas):
        raise InputError(f"--alphas must lie in [0, 4], got {alphas}")
    for name in ("harmful_n", "benign_n", "mmlu_n", "batch_size", "max_new_tokens"):
        v = getattr(args, name)
        if v is not None and v <= 0:
            raise InputError(f"--{name.replace('_', '-')} must be positive, got {v}")
    if args.split != "test" and not world:
        raise InputError(f"--split selects a world's items; for --model {args.model} pass the items to evaluate as "
                         "--harmful-data/--benign-data/--mmlu-data")
    defaults = worlds.module(args.model).EVAL_DEFAULTS if world else {"max_new_tokens": 16, "batch_size": 32}
    cfg = Config(
        model=args.model, utility_adapter=args.utility_adapter, safety_adapter=args.safety_adapter,
        methods=methods, alphas=sorted(set(alphas)), harmful_n=args.harmful_n, benign_n=args.benign_n,
        mmlu_n=args.mmlu_n, k_shot=args.k_shot, baseline=args.baseline, quick=args.quick, split=args.split,
        seed=args.seed, batch_size=args.batch_size or defaults["batch_size"],
        max_new_tokens=args.max_new_tokens or defaults["max_new_tokens"], n_boot=args.n_boot,
        harmful_data=args.harmful_data, benign_data=args.benign_data, mmlu_data=args.mmlu_data,
        safety_data=args.safety_data, utility_data=args.utility_data, backend=args.backend,
    )
    if args.align_base and not args.align_model:
        raise InputError("--align-base needs --align-model (the aligned model whose difference from it is the alignment direction)")
    if args.align_model:
        users = [m for m in ALIGN_METHODS if m in cfg.methods]
        if not users:
            raise InputError(f"--align-model is used by {', '.join(ALIGN_METHODS)}; add one of them to --methods")
        for name in ("align_model", "align_base"):
            path = getattr(args, name)
            if path and not Path(path).is_dir():
                raise InputError(f"--{name.replace('_', '-')} {path} is not a directory; give a model directory (safetensors)")
        for m in users:
            cfg.options[m] = {"align_model": str(args.align_model), "align_base": args.align_base and str(args.align_base)}
    if args.tuned:
        _apply_tuned(cfg, args.tuned)
    if cfg.quick:
        cfg.harmful_n = cfg.harmful_n or quick.get("harmful_n", 48)
        cfg.benign_n = cfg.benign_n or quick.get("benign_n", 32)
        cfg.mmlu_n = cfg.mmlu_n or quick.get("mmlu_n", 96)
    return cfg


def _apply_tuned(cfg: Config, path: str) -> None:
    """Take each method's options and dev-chosen α from a tune file (sstmerge.tune writes it); every
    method of the run must have been tuned, on dev items of the same model, and its α is added to the sweep."""
    from .merge import METHODS

    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"--tuned {path}: cannot read it as JSON ({e}); give the tuned.json of `python -m sstmerge.tune`") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("methods"), dict):
        raise InputError(f"--tuned {path}: no 'methods' mapping; give the tuned.json of `python -m sstmerge.tune`")
    if doc.get("split") != "dev":
        raise InputError(f"--tuned {path} was tuned on split {doc.get('split')!r}, not dev; tune on dev items only")
    if cfg.split != "test":
        raise InputError("--tuned reports the test items; the dev items are the ones tune chose on (drop --split dev)")
    if doc.get("model") != cfg.model:
        raise InputError(f"--tuned {path} was tuned for --model {doc.get('model')!r}, this run is {cfg.model!r}")
    missing = [m for m in cfg.methods if m not in doc["methods"]]
    if missing:
        raise InputError(f"--tuned {path} has no choice for {', '.join(missing)}; tune them too or drop them from --methods")
    for m in cfg.methods:
        choice = doc["methods"][m]
        opts = choice.get("options")
        if not isinstance(opts, dict) or set(opts) - set(METHODS[m].defaults):
            raise InputError(f"--tuned {path}: {m}'s options {opts!r} are not options of {m} "
                             f"({', '.join(METHODS[m].defaults)})")
        clash = {k for k in set(opts) & set(cfg.options.get(m, {})) if opts[k] != cfg.options[m][k]}
        if clash:
            raise InputError(f"--tuned {path} chose {m} with {', '.join(f'{k}={opts[k]}' for k in sorted(clash))}, "
                             "which the command line sets otherwise; tune with the same flags")
        cfg.options[m] = {**cfg.options.get(m, {}), **opts}
        cfg.chosen_alpha[m] = float(choice["alpha"])
    cfg.alphas = sorted(set(cfg.alphas) | set(cfg.chosen_alpha.values()))
    cfg.tuned = str(path)
    cfg.tuned_hashes = dict(doc.get("hashes") or {})


#: The methods that take an alignment direction from an aligned/unaligned model pair (--align-model).
ALIGN_METHODS = ("safe_lora", "safemerge", "safe_lora_adapter", "safemerge_adapter")
#: Those of them that need one (the published methods); a world's aligned twin is their default pair.
PAIR_METHODS = ("safe_lora", "safemerge")
#: The inputs a tune file must share with the run it is used in (the items differ: dev vs test).
TUNED_SAME = ("base_model", "utility_adapter", "safety_adapter", "safety", "utility", "align_model", "align_base")


def _check_tuned(cfg: Config, prep: "Prepared") -> None:
    if cfg.tuned is None:
        return
    differ = [k for k in TUNED_SAME if cfg.tuned_hashes.get(k) != prep.hashes.get(k)]
    if differ:
        raise InputError(f"--tuned {cfg.tuned} was tuned with another {', '.join(differ)} than this run's "
                         "(sha256 differs); tune again on this model's dev items")


def options_of(cfg: Config, method: str) -> dict:
    """The options a method runs with: its defaults, overridden by --align-model/--align-base and --tuned."""
    from .merge import default_options

    return {**default_options(method), **cfg.options.get(method, {})}


# ----------------------------------------------------------------------------- helpers


def is_world(model: str, utility_adapter: str | None, safety_adapter: str | None) -> bool:
    """A package-built world (:data:`sstmerge.worlds.WORLDS`) given without adapters; ``tiny`` trains its
    own, so adapters given with it are an error."""
    if model == "tiny" and (utility_adapter or safety_adapter):
        raise InputError("the tiny world trains its own adapters; --utility/--safety-adapter need another --model")
    return model in worlds.WORLDS and not (utility_adapter or safety_adapter)


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _git_dirty() -> bool | None:
    """Whether the package's source differs from that commit (tracked files under python/ and csrc/)."""
    pkg = Path(__file__).resolve().parent
    root = pkg.parents[1]
    if pkg != root / "python" / "sstmerge":  # an installed copy: its source is not the work tree's
        return None
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "python", "csrc"],
                             cwd=root, capture_output=True, text=True, timeout=5)
        return bool(out.stdout.strip()) if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _versions() -> dict:
    import numpy
    import peft
    import torch
    import transformers

    from .ops import backends

    return {
        "sstmerge": __version__, "python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers.__version__, "peft": peft.__version__, "numpy": numpy.__version__,
        "platform": platform.platform(), "cpu": io.cpu_model(),
        "backends": {k: (v.detail if v.usable else f"unusable: {v.reason}") for k, v in backends().items()},
    }


class Cache:
    """A stage output under the run dir, valid while its stored key matches the current inputs."""

    def __init__(self, root: Path, log: Callable[[str], None]):
        self.root = root
        self.log = log

    def has(self, rel: str, key: dict) -> bool:
        """Whether ``rel/`` holds a directory built for ``key``."""
        path = self.root / rel
        return (path / ".key").exists() and (path / ".key").read_text().strip() == _hash(key)

    def directory(self, rel: str, key: dict, build: Callable[[Path], None]) -> Path:
        """A directory built by ``build(tmp)`` and renamed into place, with its key in .key."""
        path = self.root / rel
        if self.has(rel, key):
            self.log(f"  cached: {rel}/")
            return path
        for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a run killed mid-build
            shutil.rmtree(stale, ignore_errors=True)
        with io.atomic_dir(path) as tmp:
            build(tmp)
            (tmp / ".key").write_text(_hash(key) + "\n")
        return path


# ----------------------------------------------------------------------------- stages


@dataclass
class Prepared:
    base: str
    utility: str
    safety: str
    harmful: list[dict]
    benign: list[dict]
    mmlu: list[dict]
    mmlu_dev: list[dict]
    safety_rows: list[dict]
    utility_rows: list[dict]
    hashes: dict


def _nonempty(rows: list[dict], path) -> list[dict]:
    if not rows:
        raise InputError(f"{path} holds no rows")
    return rows


def _take(items: list[dict], n: int | None, what: str) -> list[dict]:
    if not items:
        raise InputError(f"no {what} items to evaluate")
    return items if n is None else items[:n]


def prepare(cfg: Config, log) -> Prepared:
    from . import eval as ev
    from .data.files import read_rows

    if is_world(cfg.model, cfg.utility_adapter, cfg.safety_adapter):
        w = worlds.module(cfg.model).ensure(quick=cfg.quick, progress=True)
        base, utility, safety = str(w.base_model), str(w.utility_adapter), str(w.safety_adapter)
        files = {"harmful": cfg.harmful_data or w.split(f"harmful_{cfg.split}"),
                 "benign": cfg.benign_data or w.split(f"benign_{cfg.split}"),
                 "mmlu": cfg.mmlu_data or w.split(f"mmlu_{cfg.split}"), "mmlu_dev": w.mmlu_fewshot,
                 "safety": cfg.safety_data or w.safety_fisher, "utility": cfg.utility_data or w.utility_fisher}
    else:
        from .data import registry

        if not (cfg.utility_adapter and cfg.safety_adapter):
            raise InputError(
                f"--model {cfg.model} needs --utility-adapter DIR and --safety-adapter DIR "
                "(peft adapters trained on this base; `python -m sstmerge.train --help` trains them)"
            )
        from .models import resolve_model_dir

        base = str(resolve_model_dir(cfg.model))  # a missing checkpoint fails here, within seconds
        utility, safety = cfg.utility_adapter, cfg.safety_adapter
        files = {
            "harmful": cfg.harmful_data or registry.resolve("advbench"),
            "benign": cfg.benign_data or registry.resolve("xstest"),
            "mmlu": cfg.mmlu_data or registry.resolve("mmlu"),
            "mmlu_dev": registry.resolve("mmlu-dev") if cfg.k_shot else None,
            "safety": cfg.safety_data or registry.resolve("safety-train"),
            "utility": cfg.utility_data or registry.resolve("utility-train"),
        }
    default_pair(cfg, base, log)
    for name, path in (("utility adapter", utility), ("safety adapter", safety)):
        if not Path(path).is_dir():
            raise InputError(f"{name} {path} is not a directory; give a peft adapter dir")
    harmful = _take(ev.load_items("refusal", files["harmful"]), cfg.harmful_n, "harmful")
    benign = _take(ev.load_items("over-refusal", files["benign"]), cfg.benign_n, "benign")
    mmlu = _take(ev.load_items("mmlu", files["mmlu"]), cfg.mmlu_n, "MMLU")
    mmlu_dev = ev.load_items("mmlu", files["mmlu_dev"]) if files.get("mmlu_dev") else []
    safety_rows = _nonempty(read_rows(files["safety"]), files["safety"])
    utility_rows = _nonempty(read_rows(files["utility"]), files["utility"])
    hashes = {k: io.path_sha256(v) for k, v in files.items() if v}
    hashes["utility_adapter"] = io.path_sha256(utility)
    hashes["safety_adapter"] = io.path_sha256(safety)
    if Path(base).is_dir():
        hashes["base_model"] = io.path_sha256(base)
    for name in ("align_model", "align_base"):  # the alignment pair's content keys the merges that read it
        paths = {o.get(name) for o in cfg.options.values() if o.get(name)}
        if paths:
            hashes[name] = io.path_sha256(paths.pop())
    log(f"  items: {len(harmful)} harmful, {len(benign)} benign, {len(mmlu)} MMLU")
    return Prepared(base, utility, safety, harmful, benign, mmlu, mmlu_dev, safety_rows, utility_rows, hashes)


def default_pair(cfg: Config, base: str, log) -> None:
    """Give the methods that need an aligned/unaligned pair (:data:`PAIR_METHODS`) and were given none
    their default one, in ``cfg.options``: a world's aligned twin and base (:mod:`sstmerge.worlds.aligned`),
    or a registry model as the aligned model with its pretrained-only model (``ModelSpec.unaligned``) as
    in the paper. Anything else is an error naming the flags."""
    todo = [m for m in PAIR_METHODS if m in cfg.methods and not cfg.options.get(m, {}).get("align_model")]
    if not todo:
        return
    from .models import REGISTRY, resolve_model_dir

    if is_world(cfg.model, cfg.utility_adapter, cfg.safety_adapter):
        log(f"  alignment pair for {', '.join(todo)}: the {cfg.model} world's aligned twin and its base")
        aligned, unaligned = worlds.module(cfg.model).aligned_pair(progress=True)
    elif cfg.model in REGISTRY and REGISTRY[cfg.model].unaligned:
        spec = REGISTRY[cfg.model]
        log(f"  alignment pair for {', '.join(todo)}: {spec.hf_id} and its pretrained model {spec.unaligned}")
        aligned, unaligned = base, resolve_model_dir(spec.unaligned)  # offline and absent: a one-line error
    else:
        raise InputError(f"{' and '.join(todo)} read an aligned/unaligned model pair, and --model {cfg.model} has "
                         "no default one: pass --align-model DIR (and --align-base DIR), run their *_adapter "
                         "variants instead, or leave them out of --methods")
    for m in todo:
        cfg.options[m] = {**cfg.options.get(m, {}), "align_model": str(aligned), "align_base": str(unaligned)}


def _point_key(method: str, alpha: float) -> str:
    return f"{method}_a{alpha:g}"


def merge_points(cfg: Config, prep: Prepared, fisher, method: str, options: dict, alphas, cache: Cache,
                 tag: str | None = None) -> dict[str, tuple[str, dict]]:
    """One method with ``options`` at every α, each written (once; cached by method, α, options, inputs
    and Fisher) as ``merged/<tag>_a<α>/``: ``{key: (adapter dir, diagnostics)}``. Every α not cached
    is merged in one sweep, so each layer's α-independent work is done once."""
    from . import merge as mg

    tag = tag or method
    keys = {a: (_point_key(tag, a), {"method": method, "alpha": a, "seed": cfg.seed, "hashes": prep.hashes,
                                     "options": options, "fisher": fisher.key if fisher is not None else None})
            for a in alphas}
    todo = [a for a, (key, mkey) in keys.items() if not cache.has(f"merged/{key}", mkey)]
    swept = dict(zip(todo, mg.merge_sweep(method, prep.base, prep.utility, prep.safety, alphas=todo, fisher=fisher,
                                          seed=cfg.seed, backend=cfg.backend, **options))) if todo else {}
    out = {}
    for a, (key, mkey) in keys.items():
        path = cache.directory(f"merged/{key}", mkey, lambda tmp, r=swept.get(a): r.write_into(tmp))
        diag = path / "diagnostics.json"
        out[key] = (str(path), json.loads(diag.read_text()) if diag.exists() else {})
    swept.clear()
    return out


def evaluate_models(cfg: Config, prep: Prepared, adapters: dict[str, str | None], cache: Cache, log) -> dict:
    """Per-item records of every model: {key: {"safety": [...], "over_refusal": [...], "utility": [...]}}.

    ``adapters`` maps a model key to a peft adapter dir, or None for the base model alone. The base is
    loaded once; each adapter is fused into its weights, evaluated, and the weights restored exactly
    (:mod:`sstmerge.eval.fused`: ~30 % faster than a peft wrapper on a CPU, the same function up to
    one rounding of each fused weight).
    """
    from tqdm.auto import tqdm

    from . import eval as ev
    from .eval.fused import FusedAdapters
    from .models import load_model

    items_key = {"harmful": [r["id"] for r in prep.harmful], "benign": [r["id"] for r in prep.benign],
                 "mmlu": [r["id"] for r in prep.mmlu], "hashes": prep.hashes, "k_shot": cfg.k_shot,
                 "max_new_tokens": cfg.max_new_tokens, "adapters_applied": "fused",
                 "refusal_stop": "settled_refusal"}  # refused outputs end at their first complete refusing sentence
    loaded = {}

    def base_model():
        if "m" not in loaded:
            loaded["m"], loaded["t"] = load_model(prep.base)
        return loaded["m"], loaded["t"]

    out = {}
    for key, adapter in tqdm(adapters.items(), desc="evaluate", unit="model"):
        adapter_hash = io.path_sha256(adapter) if adapter else None

        def run(adapter=adapter):
            model, tok = base_model()
            if "fuse" not in loaded:
                loaded["fuse"] = FusedAdapters(model, backend=cfg.backend)
            with loaded["fuse"](adapter) if adapter else contextlib.nullcontext(model) as m:
                m.eval()
                kw = dict(max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size)
                return {
                    "safety": ev.evaluate_refusal(m, tok, [r["prompt"] for r in prep.harmful],
                                                  ids=[r["id"] for r in prep.harmful], **kw),
                    "over_refusal": ev.evaluate_refusal(m, tok, [r["prompt"] for r in prep.benign],
                                                        ids=[r["id"] for r in prep.benign], **kw),
                    "utility": ev.evaluate_mmlu(m, tok, prep.mmlu, k_shot=cfg.k_shot,
                                                dev_items=prep.mmlu_dev, batch_size=cfg.batch_size),
                }

        def build(tmp: Path, run=run):
            for part, rows in run().items():
                io.write_jsonl(tmp / f"{part}.jsonl", rows)

        # the per-item records are the cache: eval/<key>/{safety,over_refusal,utility}.jsonl
        d = cache.directory(f"eval/{key}", {"items": items_key, "adapter": adapter_hash}, build)
        out[key] = {part: _read_records(d / f"{part}.jsonl") for part in RECORD_PARTS}
    return out


RECORD_PARTS = ("safety", "over_refusal", "utility")


def _read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def _outcomes(records: list[dict], field_name: str, ids: list) -> list[int]:
    got = [r["id"] for r in records]
    if got != ids:
        raise RuntimeError("evaluation records do not cover the run's items in order; delete the eval/ cache")
    return [int(bool(r[field_name])) for r in records]


def statistics(cfg: Config, prep: Prepared, evals: dict, baseline_key: str, diagnostics: dict) -> dict:
    ids = {"safety": [r["id"] for r in prep.harmful], "over_refusal": [r["id"] for r in prep.benign],
           "utility": [r["id"] for r in prep.mmlu]}
    field_of = {"safety": "refused", "over_refusal": "refused", "utility": "correct"}

    @functools.cache  # the rows and the verdicts read each model's records once
    def outcomes(key):
        return {p: _outcomes(evals[key][p], field_of[p], ids[p]) for p in ids}

    def summary(o):
        return {p: stats.proportion(o[p]) for p in ids}

    base = outcomes(baseline_key)
    rows = []
    for method in cfg.methods:
        for alpha in cfg.alphas:
            key = _point_key(method, alpha)
            m = outcomes(key)
            kw = dict(n_boot=cfg.n_boot, seed=cfg.seed)
            rows.append({
                "method": method, "alpha": alpha, **summary(m),
                "safety_gain": stats.paired_change(base["safety"], m["safety"], sign=1, what="refusals", **kw),
                "utility_loss": stats.paired_change(base["utility"], m["utility"], sign=-1, what="MMLU outcomes", **kw),
                "over_refusal_change": stats.paired_change(base["over_refusal"], m["over_refusal"], sign=1,
                                                           what="benign refusals", **kw),
                "safety_tax": stats.safety_tax(base["safety"], m["safety"], base["utility"], m["utility"], **kw),
                "diagnostics": diagnostics.get(key, {}),
            })
    # Holm across the grid: every method x alpha point's safety-gain and utility-loss test is one family
    family = [(r, q) for r in rows for q in ("safety_gain", "utility_loss")]
    for (r, q), p in zip(family, stats.holm([r[q]["p_value"] for r, q in family])):
        r[q]["p_holm"] = p
    refs = {name: summary(outcomes(key)) for name, key in REFERENCES.items() if key in evals}
    out = {"baseline": summary(base), "methods": rows, "references": refs, "verdicts": verdicts(cfg, outcomes)}
    out["goal"] = stats.frontier_goal(rows, out["verdicts"])
    if cfg.chosen_alpha:
        dc = out["dev_chosen"] = dev_chosen(cfg, outcomes)
        by_point = {(r["method"], r["alpha"]): r for r in rows}
        dc["goal"] = stats.frontier_goal([by_point[p["method"], p["alpha"]] for p in dc["points"]], dc["verdicts"])
    return out


def dev_chosen(cfg: Config, outcomes) -> dict:
    """SST's dev-chosen point against each baseline's dev-chosen point (one α and option set per
    method, chosen by sstmerge.tune on dev items): paired on these items, Holm across these
    comparisons only. This is the comparison free of the winner's curse of a minimum over the grid."""
    kw = dict(n_boot=cfg.n_boot, seed=cfg.seed)
    points = {m: {"method": m, "alpha": a, "options": cfg.options.get(m, {})} for m, a in cfg.chosen_alpha.items()}
    s = points["sst"]
    comps = [{"a": s, "b": p, "diff": stats.compare(outcomes(_point_key("sst", s["alpha"])),
                                                    outcomes(_point_key(m, p["alpha"])), **kw)}
             for m, p in points.items() if m != "sst"]
    return {"tuned": cfg.tuned, "points": list(points.values()), "verdicts": stats.dominance(comps)}


def verdicts(cfg: Config, outcomes) -> list[dict]:
    """Every SST point against every baseline point, paired on the same items (stats.dominance: both
    refusal and utility differences significant after Holm across all these comparisons, over-refusal
    not higher)."""
    kw = dict(n_boot=cfg.n_boot, seed=cfg.seed)
    sst = [(a, outcomes(_point_key("sst", a))) for a in cfg.alphas]
    others = [(m, a, outcomes(_point_key(m, a))) for m in cfg.methods if m != "sst" for a in cfg.alphas]
    comps = [{"a": {"method": "sst", "alpha": sa}, "b": {"method": m, "alpha": a}, "diff": stats.compare(so, o, **kw)}
             for sa, so in sst for m, a, o in others]
    return stats.dominance(comps)


REFERENCES = {"base": "ref_base", "baseline (base + utility)": "ref_utility", "safety adapter": "ref_safety"}


# ----------------------------------------------------------------------------- driver


def run(cfg: Config, out_dir: Path, stop_after: str | None = None, log=print) -> dict | None:
    from tqdm.auto import tqdm

    from . import merge as mg
    from . import report

    for name in FINAL_OUTPUTS:  # outputs of an earlier run must not outlive a failing one
        (out_dir / name).unlink(missing_ok=True)
    cache = Cache(out_dir, log)
    timings: dict[str, float] = {}

    def stage(name):
        log(f"[{name}]")
        timings[name] = time.perf_counter()

    def done(name):
        timings[name] = round(time.perf_counter() - timings[name], 3)
        return stop_after == name

    source = {"git_commit": _git_commit(), "git_dirty": _git_dirty()}  # read as the run starts, not at its end
    stage("prepare")
    prep = prepare(cfg, log)  # validates all input before the run directory is created
    _check_tuned(cfg, prep)
    out_dir.mkdir(parents=True, exist_ok=True)
    if done("prepare"):
        return None

    stage("fisher")
    fisher_dir = out_dir / "fisher"
    fisher = mg.fisher_inputs(
        cfg.methods, prep.base, prep.utility, prep.safety, safety_rows=prep.safety_rows,
        utility_rows=prep.utility_rows, cache_dir=fisher_dir, backend=cfg.backend, seed=cfg.seed, progress=True,
        options={m: options_of(cfg, m) for m in cfg.methods},
    )
    if done("fisher"):
        return None

    stage("merge")
    adapters: dict[str, str | None] = {}
    diagnostics: dict[str, dict] = {}
    for method in tqdm(cfg.methods, desc="merge", unit="method"):
        for key, (path, diag) in merge_points(cfg, prep, fisher, method, options_of(cfg, method), cfg.alphas,
                                              cache).items():
            adapters[key], diagnostics[key] = path, diag
    sst_diag = [k for k in adapters if k.startswith("sst_")]
    if not sst_diag or not all((Path(adapters[k]) / "diagnostics.json").exists() for k in sst_diag):
        raise RuntimeError("SST-Merge wrote no diagnostics: it did not run; refusing to report results")
    if done("merge"):
        return None

    stage("evaluate")
    baseline_key = "ref_utility" if cfg.baseline == "utility" else "ref_base"
    models = {"ref_base": None, "ref_utility": prep.utility, "ref_safety": prep.safety, **adapters}
    evals = evaluate_models(cfg, prep, models, cache, log)
    if done("evaluate"):
        return None

    stage("stats")
    results = statistics(cfg, prep, evals, baseline_key, diagnostics)
    done("stats")

    stage("report")
    results = {
        "baseline_kind": "base + utility adapter" if cfg.baseline == "utility" else "base model alone",
        **results,
        "provenance": {
            **_versions(), **source, "seed": cfg.seed,
            "data_hashes": prep.hashes,
            "config": asdict(cfg), "timings_s": timings, "out_dir": str(out_dir),
            "evaluation_records": {k: f"eval/{k}/" for k in evals},
        },
    }
    report.write_plot(results, out_dir / "safety_utility.png")
    report.write_report(results, out_dir)
    done("report")
    io.write_json(out_dir / "results.json", results)  # last: its presence means the run completed
    return results


def run_dir(path: str) -> Path:
    """``--out`` as a directory path (created later, once the input is valid); an existing file is an error."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file, not a directory; give a directory (it is created if missing)")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    cfg = _config(args)
    if args.plan:  # arithmetic only (sstmerge.plan, docs/models.md): before prepare, no weights
        from .plan import print_plan
        return print_plan(cfg)
    suffix = ("-quick" if cfg.quick else "") + ("-dev" if cfg.split == "dev" else "")
    out = run_dir(args.out or f"runs/exp1-{Path(cfg.model).name}{suffix}")
    t0 = time.perf_counter()
    results = run(cfg, out, stop_after=args.stop_after)
    if results is None:
        print(f"stopped after {args.stop_after}; run again with the same arguments to resume ({out})")
        return 0
    print(f"done in {time.perf_counter() - t0:.1f} s: {out / 'results.json'}, {out / 'report.md'}, "
          f"{out / 'safety_utility.png'}")
    sst = [r for r in results["methods"] if r["method"] == "sst"]
    for r in sst:
        t = r["safety_tax"]
        print(f"  sst α={r['alpha']:g}: refusal {r['safety']['value']:.3f}, MMLU {r['utility']['value']:.3f}, "
              f"tax {'undefined' if not t['defined'] else round(t['value'], 3)}")
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(main))
