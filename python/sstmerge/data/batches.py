"""Tokenised training batches: chat rows and MMLU rows -> ``input_ids``, ``attention_mask``, ``labels``.

Both follow the Hugging Face convention: ``labels`` equals ``input_ids`` on the tokens that count and
-100 elsewhere (prompt and padding). Only the assistant's reply counts (for chat rows, every assistant
turn including its end-of-turn token); for MMLU rows only the answer continuation " A".." D" counts.
Padding is on the right. Used by LoRA training (sstmerge.train) and by Fisher estimation.

MMLU rows are tokenised as lm-evaluation-harness 0.4.13 scores them (:func:`encode_pair`, which
sstmerge.eval.mmlu uses too): the context is :func:`sstmerge.data.formats.mmlu_prompt`, the
continuation's tokens are those of ``encode(context + continuation)`` beyond ``encode(context)``,
and ``encode`` keeps the tokenizer's special-token default, so Llama and Mistral sequences start
with BOS as they do when scored (Qwen's tokenizer adds none). Chat rows are rendered by the chat
template, which writes any BOS itself, and encoded without special tokens, as generation does.
"""

from __future__ import annotations

import random
from typing import Iterator, Mapping, Sequence

import torch

from ..errors import InputError
from .formats import MMLU_CONTINUATIONS, mmlu_prompt

IGNORE = -100


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def tok_encode(tokenizer, s: str, add_bos_token: bool | None = None) -> list[int]:
    """lm-eval 0.4.13 ``HFLM.tok_encode`` for a causal LM: the tokenizer's own special-token
    default when ``add_bos_token`` is None (Llama/Mistral prepend BOS, Qwen does not), else
    ``add_special_tokens=add_bos_token``; a string that already starts with the BOS text gets no
    second one. (lm-eval 0.4.2-0.4.8 passed ``add_special_tokens=False``: ``add_bos_token=False``.)"""
    if add_bos_token is not None:
        kwargs = {"add_special_tokens": add_bos_token}
    else:
        kwargs = {}
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if bos is not None and s.startswith(tokenizer.decode(bos)):
            kwargs = {"add_special_tokens": False}
    return list(tokenizer.encode(s, **kwargs))


def encode_pair(tokenizer, context: str, continuation: str,
                add_bos_token: bool | None = None) -> tuple[list[int], list[int]]:
    """lm-eval 0.4.13 ``TemplateLM._encode_pair`` for a causal LM: trailing whitespace of the
    context moves to the continuation; ``(ctx, whole[len(ctx):])`` with ``whole = encode(context +
    continuation)``, ``ctx = encode(context)`` (:func:`tok_encode`)."""
    if not context:
        raise ValueError("context must not be empty")
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tok_encode(tokenizer, context + continuation, add_bos_token)
    ctx = tok_encode(tokenizer, context, add_bos_token)
    return ctx, whole[len(ctx):]


def _render(tokenizer, messages, add_generation_prompt: bool) -> str:
    if getattr(tokenizer, "chat_template", None) is None:
        raise InputError("the tokenizer has no chat template; chat rows need one (use an instruct model)")
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)


def encode_chat(tokenizer, messages: Sequence[Mapping]) -> tuple[list[int], list[int]]:
    """Token ids of a rendered conversation and labels that count only the assistant turns.

    Each assistant turn's tokens are found as the difference between the conversation rendered up to
    and including that turn and rendered up to it with the generation prompt; the template must render
    prefixes consistently (all common chat templates do), otherwise this raises.
    """
    if not messages or messages[-1].get("role") != "assistant":
        raise InputError("a chat training row must end with an assistant message")
    ids: list[int] = []
    labels: list[int] = []
    for k, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        prompt = _encode(tokenizer, _render(tokenizer, messages[:k], add_generation_prompt=True))
        full = _encode(tokenizer, _render(tokenizer, messages[:k + 1], add_generation_prompt=False))
        if full[:len(prompt)] != prompt or full[:len(ids)] != ids:
            raise InputError("the chat template does not render conversation prefixes consistently; "
                             "cannot locate the assistant tokens")
        labels += [IGNORE] * (len(prompt) - len(ids)) + full[len(prompt):]
        ids = full
    return ids, labels


def encode_mmlu(tokenizer, item: Mapping, shots: Sequence[Mapping] = ()) -> tuple[list[int], list[int]]:
    """Token ids of the lm-evaluation-harness MMLU context + the correct answer continuation, and labels."""
    answer = int(item["answer"])
    if not 0 <= answer <= 3:
        raise InputError(f"MMLU item {item.get('id', '?')}: answer must be 0-3, got {answer}")
    ctx, cont = encode_pair(tokenizer, mmlu_prompt(item, shots), MMLU_CONTINUATIONS[answer])
    if not cont:
        raise InputError(f"MMLU item {item.get('id', '?')}: the answer continuation encodes to no tokens")
    return ctx + cont, [IGNORE] * len(ctx) + cont


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise InputError("the tokenizer has neither a pad token nor an eos token to pad with")
    return int(pad)


def _collate(encoded: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    n = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), n), pad_id, dtype=torch.long)
    attention = torch.zeros((len(encoded), n), dtype=torch.long)
    labels = torch.full((len(encoded), n), IGNORE, dtype=torch.long)
    for i, (ids, lab) in enumerate(encoded):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        attention[i, :len(ids)] = 1
        labels[i, :len(lab)] = torch.tensor(lab)
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def _truncate(ids: list[int], labels: list[int], max_length: int, where: str):
    ids, labels = ids[:max_length], labels[:max_length]
    if all(x == IGNORE for x in labels):
        raise InputError(f"{where}: no answer token is left within max_length={max_length}; raise max_length")
    return ids, labels


def _batches(encoded, batch_size: int, pad_id: int, shuffle: bool, seed: int) -> Iterator[dict[str, torch.Tensor]]:
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    order = list(range(len(encoded)))
    if shuffle:
        random.Random(seed).shuffle(order)
    for s in range(0, len(order), batch_size):
        yield _collate([encoded[i] for i in order[s:s + batch_size]], pad_id)


def chat_batches(tokenizer, rows: Sequence[Mapping], batch_size: int, max_length: int = 512, *,
                 shuffle: bool = False, seed: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of chat rows ``{"messages": [...]}``; only assistant tokens are labelled.

    Rows are tokenised once, up front; ``shuffle`` permutes them with ``seed``. The last batch may be
    smaller. A row longer than ``max_length`` is cut on the right.
    """
    encoded = []
    for i, row in enumerate(rows):
        if "messages" not in row:
            raise InputError(f"chat row {i} has no 'messages' (keys: {sorted(row)})")
        ids, lab = encode_chat(tokenizer, row["messages"])
        encoded.append(_truncate(ids, lab, max_length, f"chat row {i}"))
    if not encoded:
        raise InputError("no chat rows to batch")
    return _batches(encoded, batch_size, _pad_id(tokenizer), shuffle, seed)


def mmlu_batches(tokenizer, items: Sequence[Mapping], batch_size: int, max_length: int = 1024, *,
                 shots: Sequence[Mapping] = (), shuffle: bool = False, seed: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of MMLU rows (cais/mmlu columns): the harness's prompt + the correct " A".." D".

    Only the answer continuation is labelled. ``shots`` are k-shot examples (the dev split) prepended
    as lm-evaluation-harness does. A row is cut on the right at ``max_length``; one whose answer falls
    beyond it raises.
    """
    encoded = []
    for i, item in enumerate(items):
        missing = {"question", "subject", "choices", "answer"} - set(item)
        if missing:
            raise InputError(f"MMLU row {i} lacks {sorted(missing)} (cais/mmlu columns are question, subject, choices, answer)")
        ids, lab = encode_mmlu(tokenizer, item, shots)
        encoded.append(_truncate(ids, lab, max_length, f"MMLU row {i}"))
    if not encoded:
        raise InputError("no MMLU rows to batch")
    return _batches(encoded, batch_size, _pad_id(tokenizer), shuffle, seed)


def row_kind(row: Mapping) -> str:
    """``"chat"`` for ``{"messages": ...}`` rows, ``"mmlu"`` for cais/mmlu rows; InputError otherwise."""
    if "messages" in row:
        return "chat"
    if {"question", "choices", "answer"} <= set(row):
        return "mmlu"
    raise InputError(f"a training row must be chat ({{'messages': [...]}}) or MMLU (question, choices, answer); got keys {sorted(row)}")


def encode_rows(tokenizer, rows: Sequence[Mapping], max_length: int = 512) -> list[tuple[list[int], list[int]]]:
    """``(input_ids, labels)`` of chat and/or MMLU rows, each by its own kind (tokenised once, for reuse).

    A task SFT set may mix both (the tiny world's utility data: quizzes and chats of technical help)."""
    if not rows:
        raise InputError("no training rows")
    out = []
    for i, row in enumerate(rows):
        kind = row_kind(row)
        ids, lab = encode_chat(tokenizer, row["messages"]) if kind == "chat" else encode_mmlu(tokenizer, row)
        out.append(_truncate(ids, lab, max_length, f"{kind} row {i}"))
    return out


def batch_encoded(tokenizer, encoded: Sequence[tuple[list[int], list[int]]], batch_size: int, *,
                  shuffle: bool = False, seed: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of pre-encoded rows (from :func:`encode_rows`)."""
    return _batches(list(encoded), batch_size, _pad_id(tokenizer), shuffle, seed)


def training_batches(tokenizer, rows: Sequence[Mapping], batch_size: int, max_length: int = 512, *,
                     shuffle: bool = False, seed: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of chat and/or MMLU rows (see :func:`encode_rows`)."""
    return batch_encoded(tokenizer, encode_rows(tokenizer, rows, max_length), batch_size, shuffle=shuffle, seed=seed)
