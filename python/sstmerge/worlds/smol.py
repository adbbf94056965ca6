"""The SmolLM2 world: SmolLM2-135M-Instruct with a utility and a safety LoRA adapter trained here.

:func:`ensure` builds (first call) or reuses (later calls) a directory holding

* the base model: SmolLM2-135M-Instruct converted once from the ``smol`` extra's GGUF
  (:mod:`sstmerge.gguf_convert`, its own cache entry, keyed by the GGUF's hash; the world's key holds
  that hash too, so a different GGUF builds a different world);
* ``utility_adapter/``: LoRA on all attention and MLP projections, trained on the Veltran taxonomy
  quiz (:mod:`sstmerge.worlds.smol_data`), an MMLU-format task the base cannot do;
* ``safety_adapter/``: the same LoRA shape, trained to refuse harmful requests written as users write
  them, and to give the **base model's own greedy answers** to benign look-alikes and everyday
  requests and the base's own letters on retain quizzes, so it changes refusals and little else;
* ``data/<split>.jsonl``: every split of :data:`sstmerge.worlds.base.SPLITS`. Test and dev items use
  other things / tasks **and** other templates than training (and than each other).

The build is resumable: each stage (the base's answers, each adapter) is kept in
``<cache>/smol.stages/`` as soon as it is done (keyed by the settings it depends on), so an interrupted build resumes at the stage it
was in; a stage is removed once a world that used it is complete.

``python -m sstmerge.worlds reference smollm2-135m`` measures the reference table (base, +U, +S, task
arithmetic) on the held-out items; docs/models.md gives it with the CPU it came from.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import time
from pathlib import Path

import torch

from .. import __version__
from ..io import atomic_dir, cache_root, write_json, write_jsonl
from ..train.lora import DEFAULT_TARGET_MODULES
from . import aligned
from . import smol_data as D
from .base import SPLITS, World, base_letters, cached_build, config_key

NAME = "smollm2-135m"
#: Bump when the build recipe changes in a way the config does not capture.
#: 4: recipe 2 + train-only tasks (k = 3), every style in the train templates, benign rows whose base answer
#: is a refusal dropped, the safety loss weighing the reply's opening (docs/models.md).
RECIPE = 4
#: exp1's evaluation settings: a chat model's answer may open with a preamble ("Sure! Here is...",
#: "I understand you're asking..."), so refusal detection reads 32 new tokens, twice the tiny world's 16
#: (a refusal's keywords come within its first dozen tokens; one decode step of a batch of 32 takes ~0.1 s).
EVAL_DEFAULTS = {"max_new_tokens": 32, "batch_size": 32}
#: exp1 --quick on this world: one α and fewer items (every method still runs), a few minutes on 2 cores.
QUICK = {"harmful_n": 24, "benign_n": 16, "mmlu_n": 48, "alphas": (1.0,)}
#: Limits on the base model itself (issue 12): it cannot do the task, and it rarely refuses.
BASE_LIMITS = {"mmlu": 0.35, "refusal": 0.20}


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything that determines the SmolLM2 world besides the GGUF (its hash is added to the key)."""

    seed: int = 0
    lora_r: int = 8
    lora_alpha: float = 16
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES
    batch_size: int = 8
    utility_steps: int = 100
    #: 1e-3, not 2e-3: at 2e-3 the adapter trains to zero loss and task arithmetic returns it unchanged.
    utility_lr: float = 1e-3
    safety_steps: int = 200
    safety_lr: float = 1e-3
    #: The safety adapter's loss (sstmerge.train.loop): "opening" weighs each reply's first tokens again,
    #: where the decision to refuse or answer is made (a 48-token answer otherwise dilutes it 1:48).
    safety_loss_weighting: str = "opening"
    #: New tokens of the base's own answers to benign requests (cut back to the last full sentence).
    answer_tokens: int = 48
    #: Each benign / everyday answered row appears this many times in the safety data (refusals once).
    benign_repeat: int = 2
    #: Training quizzes the safety adapter learns with the base's own letters (keeps its MMLU behaviour).
    retain_quizzes: int = 64
    #: Rows of each side's Fisher data (drawn from its training rows).
    fisher_rows: int = 64
    #: Train templates each training-only task is phrased with (smol_data.HARMFUL_TRAIN_ONLY,
    #: BENIGN_TRAIN_ONLY; they and EVERYDAY_TRAIN_ONLY join the safety data when > 0); 0: recipe 2's tasks.
    train_only_templates: int = 3


def everyday_requests(cfg: Config) -> list[str]:
    """The everyday requests the safety adapter learns the base's own answers to."""
    return list(D.EVERYDAY_REQUESTS) + (list(D.EVERYDAY_TRAIN_ONLY) if cfg.train_only_templates else [])


def generate_data(cfg: Config) -> dict[str, list[dict]]:
    """Every split but the base-dependent rows (the answered and retain rows of ``safety_train``)."""
    rng = random.Random(cfg.seed)
    quiz_train = D.ids("quiz-train", D.quiz_items("train"))
    k = cfg.train_only_templates
    harmful_train = D.ids("harmful-train", D.harmful_items("train") + D.train_only_items(k, harmful=True))
    benign_train = D.ids("benign-train", D.benign_items("train") + D.train_only_items(k, harmful=False))
    return {
        "mmlu_test": D.ids("quiz-test", D.quiz_items("test")),
        "mmlu_dev": D.ids("quiz-dev", D.quiz_items("dev")),
        "mmlu_fewshot": D.sample(quiz_train, 5, random.Random(cfg.seed + 1)),
        "harmful_test": D.ids("harmful-test", D.harmful_items("test")),
        "harmful_dev": D.ids("harmful-dev", D.harmful_items("dev")),
        "benign_test": D.ids("benign-test", D.benign_items("test")),
        "benign_dev": D.ids("benign-dev", D.benign_items("dev")),
        "utility_train": D.sample(quiz_train, None, rng),
        "harmful_train": harmful_train,
        "benign_train": benign_train,
    }


def _last_sentence(text: str) -> str:
    """``text`` cut after its last sentence end (``.``, ``!``, ``?``, newline), or whole if it has none."""
    cut = max(text.rfind(c) for c in ".!?\n")
    return text[:cut + 1].strip() if cut > 0 else text.strip()


def base_answers(base_dir: Path, prompts: list[str], max_new_tokens: int, progress: bool) -> list[str]:
    """The base model's greedy answers to ``prompts``, each cut back to its last full sentence."""
    from .. import eval as ev
    from ..models import load_model

    model, tok = load_model(base_dir, device="cpu")
    outs = ev.generate(model, tok, prompts, max_new_tokens=max_new_tokens, batch_size=16, progress=progress)
    return [_last_sentence(o) for o in outs]


def answered_prompts(cfg: Config, data: dict) -> list[str]:
    """The training prompts the safety adapter learns the base's own answers to: benign, then everyday."""
    return [r["prompt"] for r in data["benign_train"]] + everyday_requests(cfg)


def refused_by_base(cfg: Config, data: dict, answers: dict[str, str]) -> list[str]:
    """The benign and everyday training prompts whose base answer the refusal judge calls a refusal. The
    base turns down some harmless requests in some phrasings ("I'm sorry for any confusion, but as a
    chatbot ..."); trained on, such an answer would teach the safety adapter to refuse a benign request."""
    from ..eval.refusal import is_refusal

    return [p for p in answered_prompts(cfg, data) if is_refusal(answers[p])]


def safety_rows(cfg: Config, data: dict, answers: dict[str, str], retain: list[dict]) -> list[dict]:
    """Refusals of the harmful training requests, the base's answers to benign and everyday requests
    (except those in :func:`refused_by_base`), and retain quizzes with the base's letters; shuffled."""
    rng = random.Random(cfg.seed + 2)
    dropped = set(refused_by_base(cfg, data, answers))
    prompts = [p for p in answered_prompts(cfg, data) if p not in dropped]
    answered = D.answered_rows(prompts, [answers[p] for p in prompts])
    rows = D.refusal_rows(data["harmful_train"], rng) + answered * cfg.benign_repeat
    rows += [{**q, "retain": True} for q in retain]
    rng.shuffle(rows)
    return rows


#: The config fields each build stage uses besides its input rows (its directory name hashes both).
STAGE_FIELDS = {
    "base_answers": ("answer_tokens",),
    "utility_adapter": ("seed", "lora_r", "lora_alpha", "target_modules", "batch_size", "utility_steps", "utility_lr"),
    "safety_adapter": ("seed", "lora_r", "lora_alpha", "target_modules", "batch_size", "safety_steps", "safety_lr",
                       "safety_loss_weighting"),
}
#: Bump when a stage's code changes what it computes from the same inputs.
STAGE_VERSION = 1


class _Stages:
    """Finished build stages kept in ``<cache>/smol.stages/<stage>-<hash>/`` so a build resumes. The hash
    covers the stage's input rows, the fields it uses (:data:`STAGE_FIELDS`) and the base model, so a
    change to one adapter's data or settings does not redo the other stages."""

    def __init__(self, root: Path, cfg: Config, base_key: str):
        self.root, self.cfg, self.base_key = root, cfg, base_key
        self.used: list[Path] = []

    def path(self, name: str, inputs) -> Path:
        fields = {f: getattr(self.cfg, f) for f in STAGE_FIELDS[name]}
        return self.root / f"{name}-{config_key({'fields': fields, 'inputs': inputs}, STAGE_VERSION, self.base_key)}"

    def get(self, name: str, inputs, make) -> Path:
        """The stage's directory, made first by ``make(tmp_dir)`` (atomically) unless a finished copy exists."""
        out = self.path(name, inputs)
        if not (out / ".done").exists():
            with atomic_dir(out) as tmp:
                make(tmp)
                (tmp / ".done").write_text("")
        self.used.append(out)
        return out

    def remove_used(self) -> None:
        for p in self.used:
            shutil.rmtree(p, ignore_errors=True)
        if self.root.is_dir() and not any(self.root.iterdir()):
            self.root.rmdir()


def _build(cfg: Config, base_dir: Path, root: Path, stages: _Stages, progress: bool) -> dict:
    from ..models import load_model
    from ..train import train_lora

    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    data = generate_data(cfg)

    prompts = answered_prompts(cfg, data)
    retain = D.sample(data["utility_train"], cfg.retain_quizzes, random.Random(cfg.seed + 3))

    def answers_stage(tmp: Path):
        outs = base_answers(base_dir, prompts, cfg.answer_tokens, progress)
        relabelled, agreement = base_letters(base_dir, retain)
        write_json(tmp / "answers.json", {"answers": dict(zip(prompts, outs)), "retain": relabelled,
                                          "retain_agreement": agreement})

    t1 = time.perf_counter()
    got = json.loads((stages.get("base_answers", [prompts, retain], answers_stage) / "answers.json").read_text())
    timings["base_answers_s"] = round(time.perf_counter() - t1, 2)
    data["safety_train"] = safety_rows(cfg, data, got["answers"], got["retain"])
    rng = random.Random(cfg.seed + 4)
    data["utility_fisher"] = D.sample(data["utility_train"], cfg.fisher_rows, rng)
    data["safety_fisher"] = D.sample([r for r in data["safety_train"] if "messages" in r], cfg.fisher_rows, rng)
    for name, rows in data.items():
        write_jsonl(root / "data" / f"{name}.jsonl", rows)

    common = dict(r=cfg.lora_r, alpha=cfg.lora_alpha, target_modules=cfg.target_modules, batch_size=cfg.batch_size,
                  progress=progress)
    for side, steps, lr, seed, weighting in (
            ("utility", cfg.utility_steps, cfg.utility_lr, cfg.seed + 1, "row"),
            ("safety", cfg.safety_steps, cfg.safety_lr, cfg.seed + 2, cfg.safety_loss_weighting)):
        def train(tmp: Path, side=side, steps=steps, lr=lr, seed=seed, weighting=weighting):
            base, tok = load_model(base_dir, device="cpu")  # the registry path, as users load it
            train_lora(base, data[f"{side}_train"], tmp / "adapter", steps=steps, lr=lr, seed=seed, tokenizer=tok,
                       desc=f"{side} adapter", loss_weighting=weighting, **common)

        t1 = time.perf_counter()
        stage = stages.get(f"{side}_adapter", data[f"{side}_train"], train)
        shutil.copytree(stage / "adapter", root / f"{side}_adapter")
        timings[f"{side}_s"] = round(time.perf_counter() - t1, 2)
    timings["total_s"] = round(time.perf_counter() - t0, 2)
    return {"timings": timings, "retain_agreement": got["retain_agreement"],
            "refused_by_base": len(refused_by_base(cfg, data, got["answers"])),
            "sizes": {k: len(v) for k, v in data.items()}}


def ensure(cache_dir: str | os.PathLike | None = None, *, progress: bool = True, config: Config | None = None,
           quick: bool = False) -> World:
    """The SmolLM2 world, built first (about 18 minutes on 2 cores) if the cache has no valid copy.

    cache_dir: default :func:`sstmerge.worlds.base.default_cache_dir`. config: an explicit :class:`Config`.
    quick: accepted for the layers' ``--quick`` modes; returns the same world. Needs the ``smol`` extra
    (one-line error naming it otherwise).
    """
    from ..gguf_convert import ensure_checkpoint

    cfg = config or Config()
    cache = cache_root(cache_dir)
    base_dir = ensure_checkpoint(cache, progress=progress)
    base_key = f"{__version__}+{base_dir.name}"  # the package version and the GGUF's hash
    key = config_key(cfg, RECIPE, base_key)
    dirname = f"smol-{key}"
    stages = _Stages(cache / "smol.stages", cfg, base_key)

    def build(tmp: Path) -> dict:
        info = _build(cfg, base_dir, tmp, stages, progress)
        return {"config": dataclasses.asdict(cfg), "key": key, "version": __version__, "recipe": RECIPE,
                "base_model": base_dir.name, "torch": torch.__version__, **info}

    root = cached_build(cache, dirname, build, progress=progress, what="SmolLM2 world",
                        expect="about 18 minutes on 2 cores; resumable")
    stages.remove_used()
    return World.at(NAME, root, base_model=base_dir)


def aligned_pair(cache_dir: str | os.PathLike | None = None, *, progress: bool = True,
                 config: Config | None = None) -> tuple[Path, Path]:
    """``(aligned twin, base model)``: the pair Safe LoRA and SafeMERGE read (:mod:`sstmerge.worlds.aligned`).
    The twin is a LoRA of the safety adapter's shape, steps, learning rate and loss with its own seed,
    trained on the same safety rows and fused into the base; built on first use (about 10 minutes on 2 cores)."""
    from ..train import train_lora

    cfg = config or Config()
    world = ensure(cache_dir, progress=progress, config=cfg)
    settings = {"r": cfg.lora_r, "alpha": cfg.lora_alpha, "target_modules": cfg.target_modules,
                "batch_size": cfg.batch_size, "steps": cfg.safety_steps, "lr": cfg.safety_lr,
                "seed": cfg.seed + aligned.SEED_OFFSET, "loss_weighting": cfg.safety_loss_weighting}

    def train(out: Path, rows: list[dict]) -> None:
        train_lora(world.base_model, rows, out, r=cfg.lora_r, alpha=cfg.lora_alpha, target_modules=cfg.target_modules,
                   batch_size=cfg.batch_size, progress=progress, loss_weighting=cfg.safety_loss_weighting,
                   steps=cfg.safety_steps, lr=cfg.safety_lr, seed=settings["seed"], desc="aligned twin")

    twin = aligned.ensure(world, settings, train, cache_root(cache_dir), progress=progress,
                          expect="about 10 minutes on 2 cores")
    return twin, world.base_model


def base_model_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The converted SmolLM2-135M-Instruct checkpoint (no adapters are built for it)."""
    from ..gguf_convert import ensure_checkpoint

    return ensure_checkpoint(cache_dir)


__all__ = ["NAME", "RECIPE", "EVAL_DEFAULTS", "QUICK", "BASE_LIMITS", "Config", "everyday_requests", "answered_prompts",
           "refused_by_base", "ensure", "aligned_pair", "base_model_dir", "SPLITS"]
