"""Optional vLLM backend for the refusal tasks (generation only; MMLU always uses the HF scorer).

Offered only when ``vllm`` imports and a CUDA GPU is present (:func:`vllm_status`); otherwise the
command line does not list it and asking for it is an error. There is no fallback to the HF backend.

Prompts are rendered with the same chat template and tokenised the same way as
:func:`sstmerge.eval.generate.generate` (``add_special_tokens=False``, passed to vLLM as token ids so
vLLM does not add a second BOS), decoded greedily (``temperature=0``) with the adapter as a
``LoRARequest``. vLLM's batching is not bit-for-bit batch invariant, so its records can differ from
the HF backend's on near-ties; compare models with one backend. Not exercised on this project's
CPU-only machines: run ``python -m sstmerge.eval refusal --backend vllm ...`` against the HF backend on
a GPU before relying on it.
"""

from __future__ import annotations

import importlib.util
from typing import Any, Sequence

import torch

from sstmerge.errors import InputError


def vllm_status() -> tuple[bool, str]:
    """(usable, reason when not)."""
    if importlib.util.find_spec("vllm") is None:
        return False, "vllm is not installed"
    if not torch.cuda.is_available():
        return False, "no CUDA GPU"
    return True, ""


#: LoRA ranks vLLM accepts for ``max_lora_rank`` (vllm.config.LoRAConfig); its default is 16.
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


def lora_limits(adapters: Sequence[str]) -> dict:
    """``max_lora_rank`` (the smallest vLLM-supported rank >= every layer's rank of every adapter;
    merged adapters reach r_U + r_S, above vLLM's default 16) and ``max_loras`` (adapters in one
    batch: one here, each model is evaluated on its own)."""
    from sstmerge.adapters import load_adapter  # noqa: PLC0415

    if not adapters:
        return {}
    top = max(max((L.rank for L in load_adapter(a, what="adapter").layers.values()), default=0) for a in adapters)
    fits = [r for r in VLLM_LORA_RANKS if r >= top]
    if not fits:
        raise InputError(f"an adapter has rank {top}; vLLM supports LoRA ranks up to {VLLM_LORA_RANKS[-1]}: "
                         "merge with a lower rank (--rank) or use the HF backend")
    return {"max_lora_rank": fits[0], "max_loras": 1}


def evaluate_refusal_vllm(model_name: str, adapter: str | None, prompts: Sequence[str], ids: Sequence[Any], *,
                          max_new_tokens: int, judge) -> list[dict]:
    ok, why = vllm_status()
    if not ok:
        raise InputError(f"backend vllm is not available here: {why}")
    from vllm import LLM, SamplingParams  # noqa: PLC0415

    from sstmerge.eval.generate import chat_prompt  # noqa: PLC0415
    from sstmerge.models import resolve_model_dir  # noqa: PLC0415

    path = str(resolve_model_dir(model_name))
    llm = LLM(model=path, dtype="bfloat16", seed=0, enable_lora=bool(adapter), trust_remote_code=False,
              **lora_limits([adapter] if adapter else []))
    tok = llm.get_tokenizer()
    inputs = [{"prompt_token_ids": tok(chat_prompt(tok, p), add_special_tokens=False)["input_ids"]} for p in prompts]
    params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens)
    lora = None
    if adapter:
        from vllm.lora.request import LoRARequest  # noqa: PLC0415

        lora = LoRARequest("adapter", 1, str(adapter))
    outs = llm.generate(inputs, params, lora_request=lora, use_tqdm=False)
    records = []
    for id_, p, o in zip(ids, prompts, outs):
        text = o.outputs[0].text.strip()
        refused = judge(p, text)
        if not isinstance(refused, bool):
            raise TypeError(f"judge returned {type(refused).__name__}, not bool, for item {id_!r}")
        records.append({"id": id_, "prompt": p, "output": text, "refused": refused})
    return records
