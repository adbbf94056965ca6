"""sstmerge.models: the registry, loading local directories, and clear errors for missing weights."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

from sstmerge.errors import InputError
from sstmerge.models import REGISTRY, load_model, resolve_model_dir


def _tiny_dir(path):
    """A small random Llama + the tiny world's tokenizer, saved as a user would save a model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from sstmerge.worlds.tiny import build_tokenizer

    tok = build_tokenizer(["Which of the following is a color?", "I'm sorry, but I cannot help with that."])
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                         tie_word_embeddings=True))
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return model, tok


def test_registry_names_and_ids():
    assert {"tiny", "mistral-7b", "llama-3.1-8b", "qwen2.5-14b"} <= set(REGISTRY)
    assert REGISTRY["mistral-7b"].hf_id == "mistralai/Mistral-7B-Instruct-v0.3"
    assert REGISTRY["llama-3.1-8b"].hf_id == "meta-llama/Llama-3.1-8B-Instruct"
    assert REGISTRY["qwen2.5-14b"].hf_id == "Qwen/Qwen2.5-14B-Instruct"
    assert REGISTRY["tiny"].hf_id is None
    for spec in REGISTRY.values():
        assert spec.memory_gb > 0 and spec.dtype in ("float32", "bfloat16") and spec.notes


def test_load_local_dir_roundtrip(tmp_path):
    model, tok = _tiny_dir(tmp_path / "m")
    loaded, ltok = load_model(tmp_path / "m")
    assert not loaded.training and next(loaded.parameters()).dtype == torch.float32
    ids = ltok("Which of the following is a color?", return_tensors="pt")["input_ids"]
    assert ids.shape[1] > 3 and ltok.unk_token_id not in ids[0].tolist()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model.eval()(ids).logits)
    assert ltok.decode(ltok("I'm sorry, but I cannot help with that.")["input_ids"]) == "I'm sorry, but I cannot help with that."


def test_missing_registry_weights_fail_fast(tmp_path, monkeypatch):
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.setenv("SSTMERGE_ALLOW_DOWNLOAD", "1")  # offline wins over the permission to download
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    t0 = time.perf_counter()
    with pytest.raises(InputError) as e:
        load_model("qwen2.5-14b")
    assert time.perf_counter() - t0 < 10
    msg = str(e.value)
    assert "Qwen/Qwen2.5-14B-Instruct" in msg and str(tmp_path / "empty-hub") in msg and "--model" in msg
    assert "\n" not in msg


def test_missing_weights_cli_exits_2_within_seconds(tmp_path):
    code = ("from sstmerge.errors import cli_main; from sstmerge.models import load_model; import sys; "
            "sys.exit(cli_main(lambda argv: load_model('qwen2.5-14b')))")
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HOME": str(tmp_path / "hf"), "PATH": "/usr/bin:/bin"}
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert time.perf_counter() - t0 < 30
    assert p.returncode == 2, p.stderr
    assert p.stderr.startswith("error: weights of qwen2.5-14b (Qwen/Qwen2.5-14B-Instruct) are not available offline")
    assert "Traceback" not in p.stderr


def test_cached_hub_snapshot_is_used(tmp_path, monkeypatch):
    """A model present in the Hugging Face cache layout loads by its id without the network."""
    import huggingface_hub.constants as c

    hub = tmp_path / "hub"
    snap = hub / "models--acme--tiny-chat" / "snapshots" / ("0" * 40)
    _tiny_dir(snap)
    (hub / "models--acme--tiny-chat" / "refs").mkdir(parents=True)
    (hub / "models--acme--tiny-chat" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    assert resolve_model_dir("acme/tiny-chat") == snap
    model, tok = load_model("acme/tiny-chat")
    assert model.config.num_hidden_layers == 2


def test_bad_inputs(tmp_path):
    with pytest.raises(InputError, match="unknown model"):
        load_model("gpt-17")
    with pytest.raises(InputError, match="does not exist|unknown model"):
        load_model(tmp_path / "nowhere")
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "config.json").write_text("{}")
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"\0")
    with pytest.raises(InputError, match="safetensors only"):
        load_model(tmp_path / "pickled")
    _tiny_dir(tmp_path / "corrupt")
    (tmp_path / "corrupt" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(InputError, match="could not load"):
        load_model(tmp_path / "corrupt")
    with pytest.raises(InputError, match="unknown dtype"):
        load_model(tmp_path / "corrupt", dtype="fp8")
