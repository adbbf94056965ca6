"""MMLU utility: log-likelihood of the answer letters, as lm-evaluation-harness's ``mmlu`` task.

Prompt: :func:`sstmerge.data.formats.mmlu_prompt` (subject description, k dev-split shots chosen as
the first k of the item's subject, like lm-eval's ``first_n`` sampler, then the question). Choices are
the continuations ``" A"`` .. ``" D"``; the prediction is the argmax of their summed log-likelihoods
(lm-eval's ``acc``; a tie goes to the first letter, like ``np.argmax``). No chat template (lm-eval's
default without ``--apply_chat_template``).

Tokenisation follows lm-eval 0.4.13 (``lm_eval/api/model.py`` ``TemplateLM._encode_pair`` and
``lm_eval/models/huggingface.py`` ``HFLM.tok_encode``), implemented once in
:func:`sstmerge.data.batches.encode_pair`, which also tokenises MMLU rows for training and Fisher
estimation (so an adapter is trained and measured on the sequences it is scored on):

- trailing whitespace of the context moves to the front of the continuation;
- ``whole = encode(context + continuation)``, ``ctx = encode(context)``,
  ``cont = whole[len(ctx):]`` (the continuation is what the *joint* tokenisation adds);
- ``encode`` is ``tokenizer.encode(s)`` with the tokenizer's own special-token default when
  ``add_bos_token`` is unset (so Llama/Mistral tokenizers prepend BOS, Qwen's do not), or
  ``add_special_tokens=add_bos_token`` when set; a string that already starts with the BOS text is
  encoded without special tokens. (Older lm-eval releases, e.g. 0.4.2-0.4.8, passed
  ``add_special_tokens=False`` for causal LMs: pass ``add_bos_token=False`` to reproduce them.)
- the model input is ``(ctx + cont)[-(max_length + 1):][:-1]`` and the continuation's log-probs are
  read at its last ``len(cont)`` positions.

Differences from lm-eval that do not change what is computed: choices whose model inputs are equal
(single-token continuations of one context) share one forward pass; a batch's common token prefix
runs once and its KV cache serves every row (:func:`sstmerge.eval.generate.prefill`: the same
keys and values, up to fp32 round-off of the shorter matmuls); rows are left-padded after that
prefix with an attention mask and explicit position ids, and only the last ``len(cont)`` positions'
logits are materialised (``logits_to_keep``), so memory per batch is ``B x T`` activations plus
``B x 1 x V`` logits; log-softmax is taken in fp32 (lm-eval uses the model dtype unless ``softmax_dtype`` is set —
identical in fp32, may break near-ties differently in bf16).

Memory (documented estimate, see docs/eval.md): batches are bounded by ``batch_size`` rows and,
optionally, ``max_batch_tokens`` padded tokens. A 14B model in bf16 needs 29.5 GB for its weights
alone, so it does NOT fit one 24 GB GPU unquantised; 7-8B models (15-16 GB) leave ~7 GB, which
holds a 16k-token batch (full 0-shot MMLU, prompts <= ~600 tokens, batch 16-32) with room to spare.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Mapping, Sequence

import torch

from sstmerge.data.batches import encode_pair, tok_encode  # noqa: F401  (re-exported)
from sstmerge.data.formats import MMLU_CONTINUATIONS, mmlu_prompt
from sstmerge.errors import InputError
from sstmerge.eval.generate import length_sorted_batches, model_device, pad_token_id, prefill

_TOKENIZER_INFINITY = 1_000_000_000_000_000_019_884_624_838_656  # transformers' "no limit" value


def resolve_max_length(model, tokenizer, default: int = 2048) -> int:
    """lm-eval's rule: config n_positions / max_position_embeddings / n_ctx, else the tokenizer's
    model_max_length (unless unset), else ``default``."""
    config = getattr(model, "config", None)
    for cfg in (getattr(config, "text_config", None), config):
        for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
            v = getattr(cfg, attr, None) if cfg is not None else None
            if isinstance(v, int) and v > 0:
                return v
    v = getattr(tokenizer, "model_max_length", None)
    if isinstance(v, int) and 0 < v < _TOKENIZER_INFINITY:
        return v
    return default


def fewshot_examples(items: Sequence[Mapping], dev_items: Sequence[Mapping] | None, k: int) -> dict[str, list[Mapping]]:
    """The first ``k`` dev items of each subject present in ``items`` (lm-eval's first_n sampler)."""
    if k < 0:
        raise InputError(f"k_shot must be >= 0, got {k}")
    if k == 0:
        return defaultdict(list)
    if not dev_items:
        raise InputError(f"{k}-shot MMLU needs dev items (the dev split); none were given")
    by_subject: dict[str, list[Mapping]] = defaultdict(list)
    for d in dev_items:
        by_subject[d["subject"]].append(d)
    shots = {}
    for subject in sorted({it["subject"] for it in items}):
        have = by_subject.get(subject, [])
        if len(have) < k:
            raise InputError(f"{k}-shot MMLU: the dev items hold only {len(have)} for subject {subject!r}")
        shots[subject] = have[:k]
    return shots


def build_requests(tokenizer, items: Sequence[Mapping], shots: Mapping[str, Sequence[Mapping]], *,
                   add_bos_token: bool | None, max_length: int):
    """Per item, the model-input rows and for each choice (row index, continuation tokens).

    Returns ``rows`` (list of token lists) and ``reqs[item] = [(row, cont), ...]`` for the 4 choices.
    Choices whose inputs are identical share a row.
    """
    rows: list[list[int]] = []
    reqs: list[list[tuple[int, list[int]]]] = []
    for it in items:
        context = mmlu_prompt(it, shots.get(it["subject"], ()))
        seen: dict[tuple[int, ...], int] = {}
        per_item = []
        for cont_text in MMLU_CONTINUATIONS:
            ctx, cont = encode_pair(tokenizer, context, cont_text, add_bos_token)
            if not cont:
                raise InputError(f"the tokenizer encodes the continuation {cont_text!r} to no tokens")
            if len(cont) > max_length:
                raise InputError(f"continuation longer than the model's max length {max_length}")
            inp = tuple((ctx + cont)[-(max_length + 1):][:-1])
            if inp not in seen:
                seen[inp] = len(rows)
                rows.append(list(inp))
            per_item.append((seen[inp], cont))
        reqs.append(per_item)
    return rows, reqs


@torch.inference_mode()
def score_rows(model, rows: list[list[int]], targets: list[list[list[int]]], *, pad_id: int, batch_size: int,
               max_batch_tokens: int | None = None, progress: bool = False) -> list[list[float]]:
    """Summed fp32 log-likelihoods: ``out[r][j]`` for continuation ``targets[r][j]``, whose tokens are
    predicted by the last ``len(targets[r][j])`` positions of ``rows[r]``. Only those positions'
    logits are computed, and only the target tokens' log-probs leave the batch."""
    device = model_device(model)
    out: list[Any] = [None] * len(rows)
    batches = length_sorted_batches([len(r) for r in rows], batch_size, max_batch_tokens)
    it = batches
    if progress:
        from tqdm import tqdm  # noqa: PLC0415
        it = tqdm(batches, desc="mmlu", unit="batch")
    for batch in it:
        keep = max(len(c) for i in batch for c in targets[i])
        # the batch's common prefix (the subject line and any shared shots) runs once (generate.prefill)
        logits = prefill(model, [rows[i] for i in batch], pad_id, device, keep=keep,
                         use_cache=False)[0].logits[:, -keep:, :]
        logp = torch.log_softmax(logits.float(), dim=-1)
        for j, i in enumerate(batch):
            sums = []
            for cont in targets[i]:
                pos = torch.arange(keep - len(cont), keep, device=logp.device)
                sums.append(logp[j, pos, torch.tensor(cont, device=logp.device)].sum())
            out[i] = torch.stack(sums).cpu().tolist()
    return out


def evaluate_mmlu(model, tokenizer, items: Sequence[Mapping], *, k_shot: int = 0,
                  dev_items: Sequence[Mapping] | None = None, batch_size: int = 16,
                  max_batch_tokens: int | None = None, add_bos_token: bool | None = None,
                  max_length: int | None = None, progress: bool = False) -> list[dict]:
    """Per-item MMLU records ``{id, subject, pred, gold, correct, logprobs}`` in the input order.

    ``logprobs`` are the summed log-likelihoods of " A".." D". Items are dicts as returned by
    ``load_items("mmlu", ...)`` (an ``id`` defaults to the position). Sharded across ranks under an
    initialised torch.distributed group; every rank returns the full list.
    """
    from sstmerge.eval.dist import run_sharded  # noqa: PLC0415

    items = list(items)
    shots = fewshot_examples(items, dev_items, k_shot)
    max_len = max_length or resolve_max_length(model, tokenizer)
    pad = pad_token_id(tokenizer)

    def local(indices: list[int]) -> list[dict]:
        sub = [items[i] for i in indices]
        rows, reqs = build_requests(tokenizer, sub, shots, add_bos_token=add_bos_token, max_length=max_len)
        targets: list[list[list[int]]] = [[] for _ in rows]
        where = []  # per item, per choice: (row, index into targets[row])
        for per_item in reqs:
            where.append([])
            for r, cont in per_item:
                where[-1].append((r, len(targets[r])))
                targets[r].append(cont)
        was_training = model.training
        model.eval()
        try:
            sums = score_rows(model, rows, targets, pad_id=pad, batch_size=batch_size,
                               max_batch_tokens=max_batch_tokens, progress=progress)
        finally:
            model.train(was_training)
        recs = []
        for i, it, per_item in zip(indices, sub, where):
            lps = [float(sums[r][k]) for r, k in per_item]
            pred = max(range(4), key=lambda c: (lps[c], -c))  # first maximum, like np.argmax
            gold = int(it["answer"])
            recs.append({"id": it.get("id", i), "subject": it["subject"], "pred": pred, "gold": gold,
                         "correct": pred == gold, "logprobs": lps})
        return recs

    return run_sharded(local, len(items))
