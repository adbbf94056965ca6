"""``train_lora``: train one peft LoRA adapter on chat rows or MMLU rows and save it.

The adapter is a standard peft adapter directory (``adapter_config.json`` +
``adapter_model.safetensors``) that ``PeftModel.from_pretrained(base, dir)`` loads, plus
``train_log.json`` (the settings, the per-step losses, the row count). It is written atomically.

On a GPU the base model runs in bf16 (the LoRA weights stay fp32, peft's default) with gradient
checkpointing; on the CPU everything is fp32.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Mapping, Sequence

import torch

from ..errors import InputError
from ..io import atomic_dir, write_json
from .loop import run_steps

#: Every linear layer of a Llama/Mistral/Qwen2 decoder block.
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def train_lora(model_or_path, rows: Sequence[Mapping], out_dir: str | os.PathLike, *, r: int = 8,
               alpha: float = 16, target_modules: Sequence[str] = DEFAULT_TARGET_MODULES, steps: int = 200,
               lr: float = 1e-3, seed: int = 0, batch_size: int = 8, max_length: int = 512,
               dropout: float = 0.0, weight_decay: float = 0.0, warmup: int | None = None, tokenizer=None,
               gradient_checkpointing: bool | None = None, progress: bool = True, desc: str = "lora",
               loss_weighting: str = "token", save_dtype: torch.dtype | None = None) -> Path:
    """Train a LoRA adapter (rank ``r``, scale ``alpha / r``) on ``rows`` and save it to ``out_dir``.

    model_or_path: a registry name / directory (loaded with :func:`sstmerge.models.load_model`) or a
    loaded model (then ``tokenizer`` is required; the model is returned to its original state: the
    LoRA layers are removed after saving). rows: all chat rows ``{"messages": [...]}`` (only assistant
    tokens count) and/or MMLU rows (the harness prompt; only the answer letter counts).
    loss_weighting: ``"token"`` (transformers' mean over tokens), ``"row"`` (every row weighs the
    same) or ``"opening"`` (rows weigh the same, each reply's first tokens once more;
    :mod:`sstmerge.train.loop`). save_dtype: cast the LoRA weights to this dtype in the
    saved adapter (e.g. fp32 from an fp64 training run); default: as trained.
    Seeded: adapter initialisation and batch order follow ``seed``. Returns ``Path(out_dir)``.
    """
    from peft import LoraConfig, get_peft_model

    from ..data.batches import batch_encoded, encode_rows

    if r < 1:
        raise InputError(f"LoRA rank must be >= 1, got {r}")
    if isinstance(model_or_path, (str, os.PathLike)):
        from ..models import load_model

        model, tokenizer = load_model(model_or_path)
    else:
        model = model_or_path
        if tokenizer is None:
            raise InputError("train_lora on a loaded model needs tokenizer=")
    if hasattr(model, "peft_config"):
        raise InputError("train_lora needs a base model, not a model that already carries peft adapters")
    device = next(model.parameters()).device
    on_gpu = device.type == "cuda"
    if gradient_checkpointing is None:
        gradient_checkpointing = on_gpu
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    missing = [t for t in target_modules if t not in names]
    if missing:
        raise InputError(f"target modules {missing} are not linear layers of this model (it has {sorted(names)})")

    # validate and tokenise before touching the model
    rows = list(rows)
    encoded = encode_rows(tokenizer, rows, max_length)

    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(target_modules), lora_dropout=dropout,
                        bias="none", task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    if gradient_checkpointing:
        peft_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        peft_model.enable_input_require_grads()
    t0 = time.perf_counter()
    try:
        losses = run_steps(
            peft_model,
            lambda epoch: batch_encoded(tokenizer, encoded, batch_size, shuffle=True, seed=seed * 1000003 + epoch),
            steps=steps, lr=lr, weight_decay=weight_decay, warmup=warmup, device=device, desc=desc,
            progress=progress, autocast_dtype=torch.bfloat16 if on_gpu else None, loss_weighting=loss_weighting)
        if save_dtype is not None:
            for n, p in peft_model.named_parameters():
                if "lora_" in n:
                    p.data = p.data.to(save_dtype)
        out_dir = Path(out_dir)
        with atomic_dir(out_dir) as tmp:
            peft_model.save_pretrained(tmp, safe_serialization=True)
            write_json(tmp / "train_log.json", {
                "r": r, "alpha": alpha, "target_modules": list(target_modules), "steps": steps, "lr": lr,
                "seed": seed, "batch_size": batch_size, "max_length": max_length, "dropout": dropout,
                "weight_decay": weight_decay, "loss_weighting": loss_weighting, "rows": len(rows),
                "seconds": round(time.perf_counter() - t0, 2),
                "loss_first10": sum(losses[:10]) / len(losses[:10]), "loss_last10": sum(losses[-10:]) / len(losses[-10:]),
                "losses": [round(x, 5) for x in losses]})
    finally:
        if gradient_checkpointing:
            peft_model.gradient_checkpointing_disable()
        peft_model.unload()  # the caller's model without LoRA layers again
    return out_dir
