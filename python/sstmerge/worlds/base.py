"""What every world shares: the :class:`World` paths, the split names, and the cached, atomic build.

A world is a base model, a utility adapter, a safety adapter and the data they were trained and are
evaluated on, built by the package and cached on disk:

    <cache>/<prefix>-<key>/
        base_model/ (or a model directory elsewhere, e.g. a converted checkpoint)
        utility_adapter/  safety_adapter/      peft LoRA adapters
        data/<split>.jsonl                      one file per split (see SPLITS)
        world.json                              the config, timings and the reference table
        manifest.json                           sha256 of every file above (checked on reuse)

:func:`cached_build` writes the directory atomically (temporary sibling, then rename) under a file
lock, so concurrent callers build once, an interrupted build leaves nothing behind, and a corrupt
entry (any file whose hash differs from the manifest) is rebuilt.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Callable

from ..io import cached_dir, default_cache_dir, valid  # noqa: F401 - re-exported for the worlds

#: Every split a world writes (``data/<name>.jsonl``). Tuning uses ``*_dev``, reports use ``*_test``:
#: disjoint items drawn from different templates / topics. ``mmlu_fewshot`` holds k-shot exemplars.
SPLITS = ("mmlu_test", "mmlu_dev", "mmlu_fewshot", "harmful_test", "harmful_dev", "benign_test", "benign_dev",
          "safety_train", "utility_train", "safety_fisher", "utility_fisher")


@dataclasses.dataclass(frozen=True)
class World:
    """Paths of a built world. Data files are JSONL in the real datasets' columns (cais/mmlu, AdvBench,
    XSTest, chat rows); ``card`` is world.json (config, timings, reference table)."""

    name: str
    root: Path
    base_model: Path
    utility_adapter: Path
    safety_adapter: Path
    card: Path
    mmlu_test: Path
    mmlu_dev: Path
    mmlu_fewshot: Path
    harmful_test: Path
    harmful_dev: Path
    benign_test: Path
    benign_dev: Path
    safety_train: Path
    utility_train: Path
    safety_fisher: Path
    utility_fisher: Path

    @classmethod
    def at(cls, name: str, root: Path, base_model: Path | None = None) -> "World":
        """The layout under ``root``; ``base_model`` defaults to ``root/base_model``."""
        root = Path(root)
        d = root / "data"
        return cls(name=name, root=root, base_model=Path(base_model) if base_model else root / "base_model",
                   utility_adapter=root / "utility_adapter", safety_adapter=root / "safety_adapter",
                   card=root / "world.json", **{s: d / f"{s}.jsonl" for s in SPLITS})

    def split(self, name: str) -> Path:
        if name not in SPLITS:
            raise KeyError(f"unknown split {name!r}; splits: {', '.join(SPLITS)}")
        return getattr(self, name)

    def reference(self) -> dict:
        """The reference table recorded at build time (``world.json``'s ``reference``)."""
        return json.loads(self.card.read_text()).get("reference", {})


def config_key(config, recipe: int, version: str) -> str:
    """Hash of a world's config (a dataclass or a dict), its recipe number and the package version."""
    fields = config if isinstance(config, dict) else dataclasses.asdict(config)
    blob = json.dumps({"config": fields, "recipe": recipe, "version": version},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cached_build(cache_dir: str | os.PathLike | None, dirname: str, build: Callable[[Path], dict], *,
                 progress: bool = True, what: str = "world", expect: str = "") -> Path:
    """``<cache_dir>/<dirname>``, built first by ``build(tmp)`` unless a valid copy exists; the card
    ``build`` returns is ``world.json`` (:func:`sstmerge.io.cached_dir`)."""
    return cached_dir(cache_dir, dirname, build, card="world.json", progress=progress, what=what, expect=expect)


def base_letters(base_dir: Path, quizzes: list[dict]) -> tuple[list[dict], float]:
    """``quizzes`` (MMLU rows) relabelled with the base model's own answer (the argmax of the letters'
    log-likelihoods, as MMLU is scored), and the share whose letter was already the true one. A safety
    adapter trained on these keeps the base's MMLU behaviour instead of learning the task."""
    from .. import eval as ev
    from ..models import load_model

    if not quizzes:
        return [], float("nan")
    model, tok = load_model(base_dir, device="cpu")
    preds = ev.evaluate_mmlu(model, tok, quizzes, batch_size=64)
    agree = sum(int(p["pred"]) == int(q["answer"]) for p, q in zip(preds, quizzes)) / len(quizzes)
    return [{**q, "answer": int(p["pred"])} for p, q in zip(preds, quizzes)], round(agree, 4)
