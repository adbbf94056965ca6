"""Worlds: a base model with a utility adapter, a safety adapter and their data, built by the package.

    from sstmerge import worlds
    w = worlds.ensure("tiny")          # builds once, then reuses the cache
    w.base_model, w.utility_adapter, w.safety_adapter, w.mmlu_test, w.harmful_dev, ...

Each world is one module of the same shape: ``NAME``; a frozen ``Config``; ``ensure(cache_dir=None, *,
progress=True, config=None) -> World``; ``base_model_dir(cache_dir=None) -> Path`` (the base model alone,
without building the adapters where the base is not built by the world); ``EVAL_DEFAULTS`` (exp1's
evaluation settings that suit the model, e.g. ``max_new_tokens``); a reference table in ``world.json``:

* ``tiny`` (:mod:`sstmerge.worlds.tiny`): a 4-layer Llama built from nothing in about two minutes;
* ``smollm2-135m`` (:mod:`sstmerge.worlds.smol`): SmolLM2-135M-Instruct (the ``smol`` extra's GGUF) with
  adapters trained here on :mod:`sstmerge.worlds.smol_data`'s data. Given with ``--utility-adapter`` and
  ``--safety-adapter``, ``smollm2-135m`` is the registry model instead, with the user's adapters.

This layer sits after ``train`` and ``models`` (it uses both); ``models`` never imports it, so the model
registry resolves names without the builders' training code. Command-line front ends call
:func:`resolve_model` to turn a world name into its base model's directory.
"""

from __future__ import annotations

import importlib
import os

from ..errors import InputError
from .base import SPLITS, World, default_cache_dir

#: World name -> module (imported lazily: building a world imports training code).
WORLDS = {"tiny": "sstmerge.worlds.tiny", "smollm2-135m": "sstmerge.worlds.smol"}

__all__ = ["WORLDS", "SPLITS", "World", "default_cache_dir", "ensure", "module", "resolve_model"]


def module(name: str):
    """The module that builds world ``name``."""
    if name not in WORLDS:
        raise InputError(f"unknown world {name!r}; worlds: {', '.join(WORLDS)}")
    return importlib.import_module(WORLDS[name])


def ensure(name: str, cache_dir: str | os.PathLike | None = None, *, progress: bool = True, **kw) -> World:
    """World ``name``, built first if the cache holds no valid copy (see each world's ``ensure``)."""
    return module(name).ensure(cache_dir, progress=progress, **kw)


def resolve_model(name_or_path: str) -> str:
    """The base model directory of world ``name_or_path`` (built if needed), else ``name_or_path``."""
    if str(name_or_path) in WORLDS:
        return str(module(str(name_or_path)).base_model_dir())
    return str(name_or_path)
