"""A world's aligned twin: the aligned/unaligned model pair that Safe LoRA and SafeMERGE read.

Safe LoRA (Hsu et al., 2024) projects a task update onto the subspace of ``V = W_aligned - W_unaligned``,
the difference alignment made (Llama-2-chat minus Llama-2), and serves the aligned model; SafeMERGE
selects layers by the same subspace. Neither world's base is aligned (the tiny base refuses no test
request, SmolLM2-135M-Instruct 5 %), and SmolLM2's pretrained-only partner is not installable here. So
each world trains its aligned twin: the base fine-tuned on the world's own safety rows by a LoRA run
of its own (the safety adapter's rank, steps and learning rate, another seed), fused into a full model
directory. The pair is (twin, base): ``V`` is an update of the base that refuses harmful requests,
trained independently of the safety adapter's ``dS`` (another initialisation and data order), not
``dS`` itself, which is what the ``*_adapter`` variants of the two methods use.

    <cache>/<world dir>.aligned-<key>/
        model/        the twin: the base's safetensors with the LoRA fused in, its config and tokenizer
        adapter/      the peft LoRA it came from
        aligned.json  the settings and the training time; manifest.json (checked on reuse)

Built on first use (atomic, cached like the world; the key hashes the world's directory name and the
twin's settings).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

from ..io import cached_dir
from .base import World, config_key

#: Bump when the twin's recipe changes in a way its settings do not capture.
VERSION = 1
#: The twin's seed is the world's seed plus this (the utility and safety adapters use + 1 and + 2).
SEED_OFFSET = 7


def dirname(world: World, settings: dict) -> str:
    return f"{world.root.name}.aligned-{config_key(settings, VERSION, world.root.name)}"


def ensure(world: World, settings: dict, train: Callable[[Path, list[dict]], None], cache_dir: str | os.PathLike,
           *, progress: bool = True, expect: str = "") -> Path:
    """The twin's model directory, built first by ``train(adapter_dir, safety_rows)`` and a fuse into the
    base's weights unless the cache holds a valid copy."""
    from ..adapters import load_adapter
    from ..data.files import read_rows
    from ..merge.core import LayerFactors
    from ..merge.writers import ModelFiles, write_fused

    def build(tmp: Path) -> dict:
        t0 = time.perf_counter()
        train(tmp / "adapter", read_rows(world.safety_train))
        t1 = time.perf_counter()
        adapter = load_adapter(tmp / "adapter", what="aligned twin's adapter")
        layers = {n: LayerFactors(l.B, l.A, l.scale) for n, l in adapter.layers.items()}
        fused = write_fused(ModelFiles(world.base_model), tmp / "model", layers)
        return {"world": world.root.name, "settings": settings, "version": VERSION, "fused_layers": fused["fused_layers"],
                "timings": {"train_s": round(t1 - t0, 2), "fuse_s": round(time.perf_counter() - t1, 2)}}

    root = cached_dir(cache_dir, dirname(world, settings), build, card="aligned.json", progress=progress,
                      what=f"{world.name} world's aligned twin", expect=expect)
    return root / "model"
