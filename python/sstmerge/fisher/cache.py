"""The Fisher cache: a repeated estimate with the same inputs loads instead of recomputing.

Key = sha256 of
  - the model: class, ``config`` (JSON), and a fingerprint of every parameter: name, shape, dtype,
    and its bytes (sha256) — all bytes for tensors up to FULL_HASH_NUMEL elements and for every
    LoRA / trainable parameter; for larger frozen tensors the float64 sum, the float64 sum of
    squares and 4096 evenly strided elements (reading every byte of a 14 GB base model is not worth
    it, and a different checkpoint differs in all of them);
  - the adapters: peft configs of the active adapters;
  - the data: the hash of every batch's input_ids / attention_mask / labels (shapes and values);
  - the options of ``estimate`` that change the numbers (not ``backend``, ``progress``, ``meta``).
The entry is ``<cache_dir>/fisher-<key>.safetensors`` written atomically by FisherResult.save; a file
that fails to load or whose checksum does not match is reported with a warning and recomputed.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..errors import InputError
from .result import FisherResult, tensor_bytes

FULL_HASH_NUMEL = 1 << 22


def _param_fingerprint(h, name: str, p: torch.Tensor, full: bool) -> None:
    h.update(f"{name}|{tuple(p.shape)}|{p.dtype}|".encode())
    p = p.detach()
    if full or p.numel() <= FULL_HASH_NUMEL:
        h.update(tensor_bytes(p))
        return
    flat = p.reshape(-1)
    idx = torch.linspace(0, flat.numel() - 1, 4096, device=flat.device).long()
    d = flat.double()
    h.update(tensor_bytes(torch.stack([d.sum(), (d * d).sum()])))
    h.update(tensor_bytes(flat[idx]))


def _is_adapter(name: str, p: torch.Tensor) -> bool:
    return p.requires_grad or "lora_" in name


def describe(model: nn.Module) -> dict[str, str]:
    """Cheap provenance: class, config hash, active peft adapter configs, and the sha256 of every
    adapter (LoRA / trainable) parameter's bytes."""
    cfg = getattr(model, "config", None)
    cfg_json = cfg.to_json_string(use_diff=False) if hasattr(cfg, "to_json_string") else repr(cfg)
    adapter = ""
    peft_cfg = getattr(model, "peft_config", None)
    if isinstance(peft_cfg, dict):
        active = getattr(model, "active_adapters", None) or list(peft_cfg)
        adapter = json.dumps(
            {a: peft_cfg[a].to_dict() for a in active if a in peft_cfg}, sort_keys=True, default=str
        )
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        if _is_adapter(name, p):
            _param_fingerprint(h, name, p, full=True)
    return {
        "model_class": type(model).__name__,
        "config_hash": hashlib.sha256(cfg_json.encode()).hexdigest(),
        "adapter": adapter,
        "adapter_hash": h.hexdigest(),
    }


def model_hash(model: nn.Module, desc: dict[str, str]) -> str:
    """Fingerprint of the whole model (``desc`` from :func:`describe` plus every parameter)."""
    h = hashlib.sha256(json.dumps(desc, sort_keys=True).encode())
    for name, p in model.named_parameters():
        if not _is_adapter(name, p):
            _param_fingerprint(h, name, p, full=False)
    return h.hexdigest()


def key(model_h: str, data_h: str, options: dict) -> str:
    blob = json.dumps({"model": model_h, "data": data_h, "options": options}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def path_for(cache_dir: str | os.PathLike, k: str) -> Path:
    return Path(cache_dir) / f"fisher-{k}.safetensors"


def load(path: Path) -> Optional[FisherResult]:
    """The cached result, or None when absent; a corrupt entry warns and returns None."""
    if not path.exists():
        return None
    try:
        return FisherResult.load(path)
    except InputError as e:
        warnings.warn(f"sstmerge.fisher: ignoring corrupt cache entry {path} ({e}); recomputing",
                      RuntimeWarning, stacklevel=3)
        return None
