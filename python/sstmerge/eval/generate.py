"""Batched greedy generation for transformers causal LMs, with or without peft adapters.

Each prompt becomes one user turn rendered with the tokenizer's chat template
(``add_generation_prompt=True``) and tokenized without adding special tokens again (the template
already holds them). Prompts are sorted by token length (longest first) and cut into batches; each
batch is left-padded, with an attention mask and explicit position ids (``cumsum(mask) - 1``), so a
padded row sees exactly what it would see alone. Decoding is greedy (``argmax``; ties go to the
lowest token id) with a KV cache, stops per row at any of the tokenizer's / model's end-of-sequence
ids, and stops for the batch when every row has ended or ``max_new_tokens`` is reached.

Shared prefix: a batch's prompts usually open with the same tokens (the chat template's system
turn: 24 of SmolLM2's 40-54 tokens on its harmful test prompts). Their keys and values do not depend
on what follows (causal attention), so the prefill runs the longest common token prefix P once,
copies its cache to every row, and runs only the suffixes, left-padded after the prefix::

    tokens    [ p_0 .. p_{P-1} | pad .. pad s_0 .. s_{k-1} ]
    mask      [ 1   ..  1      |  0  ..  0   1  ..  1      ]
    position  [ 0   ..  P-1    |  -  ..  -   P  ..  P+k-1  ]

Each real token sees the positions and the keys it sees alone (the pads are masked), as in the
plain left-padded layout; P is capped so that every row keeps at least one suffix token.

``stop`` (optional): a predicate on a row's decoded text so far; a row for which it is True leaves
the batch like an ended one, its output cut there. Refusal evaluation passes
:func:`sstmerge.eval.refusal.settled_refusal`, true only once no continuation can change the
keyword verdict, so the verdicts are those of the uncut outputs.

The loop is written here rather than delegated to ``model.generate`` so that nothing from a model's
``generation_config`` (sampling flags, repetition penalties, forced tokens) can change the decoding:
the result is a pure function of the model, the tokenizer and the prompts. In fp32 the batch size
does not change the outputs (tested: batch size 1 vs 16); in bf16 the usual floating-point
differences between batch shapes can flip a near-tie.
"""

from __future__ import annotations

import inspect
from typing import Callable, Sequence

import torch

from sstmerge.errors import InputError


def model_device(model) -> torch.device:
    """Where the inputs go: the input embeddings' device (the first stage of a model split over
    GPUs by device_map; its logits come out on the last stage's device)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    w = getattr(emb, "weight", None)
    return w.device if w is not None else next(model.parameters()).device


def eos_token_ids(model, tokenizer) -> set[int]:
    """End-of-sequence ids: the tokenizer's eos plus the model's generation_config eos (may be a list)."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gc = getattr(model, "generation_config", None)
    eos = getattr(gc, "eos_token_id", None) if gc is not None else None
    if isinstance(eos, int):
        ids.add(eos)
    elif isinstance(eos, (list, tuple)):
        ids.update(int(e) for e in eos)
    if not ids:
        raise InputError("the tokenizer and the model define no eos token; generation could not stop")
    return ids


def pad_token_id(tokenizer) -> int:
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)  # any id works: padded positions are masked out
    return 0


def chat_prompt(tokenizer, prompt: str) -> str:
    """The text the model sees for a single user turn, ending with the assistant's turn opening."""
    if not getattr(tokenizer, "chat_template", None):
        raise InputError("the tokenizer has no chat_template; refusal evaluation needs a chat (instruct) model")
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )


def encode_chat(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    return [tokenizer(chat_prompt(tokenizer, p), add_special_tokens=False)["input_ids"] for p in prompts]


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s):] = 1
    return ids.to(device), mask.to(device)


def positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)


def _cache_kwarg(model) -> str:
    """The forward keyword of the KV cache: ``cache`` (transformers >= 5.2x) or ``past_key_values``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _cache_of(out):
    cache = out.get("cache") if hasattr(out, "get") else None
    return cache if cache is not None else out.past_key_values


def common_prefix_len(seqs: Sequence[Sequence[int]], keep: int = 1) -> int:
    """Length of the longest common prefix of ``seqs``, capped so every sequence keeps ``keep`` tokens after it."""
    first, cap = seqs[0], min(len(s) for s in seqs) - keep
    p = 0
    while p < cap and all(s[p] == first[p] for s in seqs):
        p += 1
    return p


def prefill(model, input_ids: list[list[int]], pad_id: int, device, *, keep: int = 1, use_cache: bool = True):
    """The prompt forward with the logits of each row's last ``keep`` positions (and the cache), the
    batch's common prefix run once (module docstring). Returns (output, attention mask, position ids)
    of the padded prompts. MMLU scoring (:mod:`sstmerge.eval.mmlu`) shares it with generation.
    ``use_cache=False`` skips the cache only without a shared prefix (which is served from one)."""
    cache_kw = _cache_kwarg(model)
    P = common_prefix_len(input_ids, keep) if len(input_ids) > 1 else 0
    if P == 0:
        ids, mask = left_pad(input_ids, pad_id, device)
        pos = positions(mask)
        return model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=use_cache,
                     logits_to_keep=keep), mask, pos
    n = len(input_ids)
    ones = torch.ones((1, P), dtype=torch.long, device=device)
    head = torch.tensor([input_ids[0][:P]], dtype=torch.long, device=device)
    past = _cache_of(model(input_ids=head, attention_mask=ones, position_ids=positions(ones), use_cache=True,
                           logits_to_keep=1))
    past.batch_repeat_interleave(n)
    ids, tail_mask = left_pad([s[P:] for s in input_ids], pad_id, device)
    mask = torch.cat([ones.expand(n, P), tail_mask], dim=1)
    pos = P + positions(tail_mask)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=keep,
                **{cache_kw: past})
    return out, mask, pos


@torch.inference_mode()
def greedy_batch(model, input_ids: list[list[int]], *, max_new_tokens: int, eos_ids: set[int], pad_id: int,
                 stop: Callable[[list[int]], bool] | None = None) -> list[list[int]]:
    """Greedy continuation token ids (without the eos) for one batch of token-id prompts; with ``stop``,
    a row also ends once ``stop(its tokens so far)`` is True."""
    device = model_device(model)
    n = len(input_ids)
    eos = torch.tensor(sorted(eos_ids), device=device)
    cache_kw = _cache_kwarg(model)
    out, mask, pos = prefill(model, input_ids, pad_id, device)
    past = _cache_of(out)
    result: list[list[int]] = [[] for _ in range(n)]
    rows = list(range(n))  # the prompt index of each row still decoding
    for step in range(max_new_tokens):
        nxt = out.logits[:, -1, :].float().argmax(dim=-1).to(device)  # logits: on the last stage's device
        ended = torch.isin(nxt, eos)
        for r, t, e in zip(rows, nxt.tolist(), ended.tolist()):
            if not e:
                result[r].append(t)
        if stop is not None:
            settled = [not e and stop(result[r]) for r, e in zip(rows, ended.tolist())]
            if any(settled):
                ended = ended | torch.tensor(settled, device=device)
        if bool(ended.all()) or step == max_new_tokens - 1:
            break
        if bool(ended.any()):  # drop the ended rows (and their cache): no live row reads them
            keep = (~ended).nonzero().squeeze(1)
            past.batch_select_indices(keep)
            nxt, mask, pos = nxt[keep], mask[keep], pos[keep]
            rows = [rows[i] for i in keep.tolist()]
        mask = torch.cat([mask, torch.ones((len(rows), 1), dtype=mask.dtype, device=device)], dim=1)
        pos = pos[:, -1:] + 1
        out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos, use_cache=True, **{cache_kw: past})
        past = _cache_of(out)
    return result


def length_sorted_batches(lengths: Sequence[int], batch_size: int, max_batch_tokens: int | None = None) -> list[list[int]]:
    """Indices sorted by length (longest first, ties by index) cut into batches of at most
    ``batch_size`` rows and, when given, at most ``max_batch_tokens`` padded tokens."""
    if batch_size < 1:
        raise InputError(f"batch size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        width = lengths[cur[0]] if cur else lengths[i]  # longest first: the first row sets the width
        if cur and (len(cur) >= batch_size or (max_batch_tokens and width * (len(cur) + 1) > max_batch_tokens)):
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


def generate(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 256, batch_size: int = 16,
             progress: bool = False, stop: Callable[[str], bool] | None = None) -> list[str]:
    """Greedy chat completions of ``prompts`` (one user turn each), in the input order. ``stop``: see
    the module docstring (a predicate on the decoded text so far)."""
    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    prompts = list(prompts)
    if not prompts:
        return []
    encoded = encode_chat(tokenizer, prompts)
    eos = eos_token_ids(model, tokenizer)
    pad = pad_token_id(tokenizer)
    outputs: list[str | None] = [None] * len(prompts)
    stop_ids = None
    if stop is not None:
        def stop_ids(toks: list[int]) -> bool:
            return stop(tokenizer.decode(toks, skip_special_tokens=True))
    batches = length_sorted_batches([len(e) for e in encoded], batch_size)
    it = batches
    if progress:
        from tqdm import tqdm  # noqa: PLC0415
        it = tqdm(batches, desc="generate", unit="batch")
    was_training = model.training
    model.eval()
    try:
        for batch in it:
            toks = greedy_batch(model, [encoded[i] for i in batch], max_new_tokens=max_new_tokens, eos_ids=eos, pad_id=pad,
                                stop=stop_ids)
            for i, t in zip(batch, toks):
                outputs[i] = tokenizer.decode(t, skip_special_tokens=True).strip()
    finally:
        model.train(was_training)
    return outputs  # type: ignore[return-value]
