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
import fcntl
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Callable

from ..io import atomic_dir, write_json

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


def default_cache_dir() -> Path:
    """``$SSTMERGE_CACHE`` or ``~/.cache/sstmerge``."""
    return Path(os.environ.get("SSTMERGE_CACHE") or Path.home() / ".cache" / "sstmerge").expanduser()


def config_key(config, recipe: int, version: str) -> str:
    """Hash of a world's config (a dataclass), its recipe number and the package version."""
    blob = json.dumps({"config": dataclasses.asdict(config), "recipe": recipe, "version": version},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def manifest(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` but the manifest itself, by relative path."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != "manifest.json":
            h = hashlib.sha256()
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            out[str(p.relative_to(root))] = h.hexdigest()
    return out


def valid(root: Path) -> bool:
    """True when ``root`` holds a manifest that matches its files."""
    try:
        recorded = json.loads((root / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return recorded == manifest(root)


def cached_build(cache_dir: str | os.PathLike | None, dirname: str, build: Callable[[Path], dict], *,
                 progress: bool = True, what: str = "world", expect: str = "") -> Path:
    """``<cache_dir>/<dirname>``, built first by ``build(tmp)`` unless a valid copy exists.

    ``build`` fills ``tmp`` and returns the card (JSON-able dict) written to ``world.json``; the manifest
    is written last. Concurrent callers wait on a lock and build once; a corrupt copy is rebuilt.
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    root = cache / dirname
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f".{dirname}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if root.exists() and valid(root):
            return root
        if root.exists():
            print(f"sstmerge: the cached {what} {root} is incomplete or corrupt; rebuilding it", file=sys.stderr)
        if progress:
            print(f"sstmerge: building the {what} in {root}{f' ({expect})' if expect else ''}", file=sys.stderr)
        with atomic_dir(root) as tmp:
            card = build(tmp)
            write_json(tmp / "world.json", card)
            write_json(tmp / "manifest.json", manifest(tmp))
        return root
