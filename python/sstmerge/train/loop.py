"""The optimisation loop shared by LoRA training and the tiny model's pretraining.

AdamW on the trainable parameters, linear warm-up then cosine decay to 10 % of ``lr``, gradient
clipping at 1.0, batches cycled epoch after epoch (reshuffled per epoch from ``seed``). Seeded: the
same inputs and seed give the same parameters on the same machine.

The loss is the mean next-token cross-entropy over the batch's counted tokens (``loss_weighting=
"token"``, transformers' own), or the mean over rows of each row's mean (``"row"``): every example
weighs the same whatever its length, so a one-token answer letter is not drowned by 20-token chat
replies in a mixed batch; or (``"opening"``) each row's ``½ mean over its counted tokens + ½ mean
over its first OPENING_TOKENS counted tokens``, rows weighing the same: a reply's opening tokens
("I'm sorry" or "Sure") carry the decision to refuse, which a 40-token answer otherwise dilutes.
"""

from __future__ import annotations

import math
import random
from typing import Callable, Iterator, Mapping, Sequence

import torch

from ..errors import InputError


def _schedule(step: int, steps: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))


LOSS_WEIGHTINGS = ("token", "row", "opening")
#: Counted tokens of each row that ``loss_weighting="opening"`` weighs again.
OPENING_TOKENS = 4


def row_mean_loss(logits: torch.Tensor, labels: torch.Tensor, opening: int = 0) -> torch.Tensor:
    """``mean_b [ mean_{t counted in row b} CE(logits[b, t-1], labels[b, t]) ]`` over rows with a counted
    token (labels ``-100`` do not count), in the logits' dtype; with ``opening = K > 0`` each row's term
    is ``½ (its mean) + ½ (mean over its first K counted tokens)``."""
    from ..data.batches import IGNORE

    lg, lab = logits[:, :-1], labels[:, 1:]
    ce = torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), lab.reshape(-1), ignore_index=IGNORE,
                                           reduction="none").view(lab.shape)
    mask = lab != IGNORE
    counted = mask.sum(1)
    keep = counted > 0
    if not bool(keep.any()):
        raise InputError("a training batch has no counted token")
    per_row = ce.sum(1)[keep] / counted[keep]
    if opening > 0:
        first = mask & (mask.cumsum(1) <= opening)  # the first K counted positions of each row
        per_row = 0.5 * per_row + 0.5 * (ce * first).sum(1)[keep] / first.sum(1)[keep]
    return per_row.mean()


def run_steps(model: torch.nn.Module, make_epoch: Callable[[int], Iterator[Mapping[str, torch.Tensor]]], *,
              steps: int, lr: float, weight_decay: float = 0.0, warmup: int | None = None,
              device: torch.device | None = None, desc: str = "train", progress: bool = True,
              autocast_dtype: torch.dtype | None = None, loss_weighting: str = "token") -> list[float]:
    """Run ``steps`` optimiser steps over batches from ``make_epoch(epoch)``; return the losses.

    loss_weighting: ``"token"`` or ``"row"`` (module docstring). A non-finite loss stops training with an
    error (no silent skipping).
    """
    from tqdm.auto import tqdm

    if loss_weighting not in LOSS_WEIGHTINGS:
        raise InputError(f"loss_weighting must be one of {LOSS_WEIGHTINGS}, got {loss_weighting!r}")
    if steps < 1:
        raise InputError(f"steps must be >= 1, got {steps}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise InputError("the model has no trainable parameters")
    device = device or next(model.parameters()).device
    warmup = max(1, steps // 20) if warmup is None else max(1, warmup)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _schedule(s, steps, warmup))
    model.train()
    losses: list[float] = []
    epoch, it = 0, make_epoch(0)
    bar = tqdm(total=steps, desc=desc, unit="step", disable=not progress, leave=False)
    try:
        while len(losses) < steps:
            batch = next(it, None)
            if batch is None:
                epoch += 1
                it = make_epoch(epoch)
                batch = next(it, None)
                if batch is None:
                    raise InputError("the training data yields no batches")
            batch = {k: v.to(device) for k, v in batch.items()}
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                if loss_weighting in ("row", "opening"):
                    labels = batch["labels"]
                    loss = row_mean_loss(model(**{k: v for k, v in batch.items() if k != "labels"}).logits, labels,
                                         OPENING_TOKENS if loss_weighting == "opening" else 0)
                else:
                    loss = model(**batch).loss
            if not torch.isfinite(loss):
                raise RuntimeError(f"{desc}: non-finite loss {loss.item()} at step {len(losses)}; lower lr")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            bar.update(1)
            if len(losses) % 10 == 0:
                bar.set_postfix(loss=f"{sum(losses[-10:]) / 10:.3f}")
    finally:
        bar.close()
    model.eval()
    return losses


def pretrain_causal_lm(model: torch.nn.Module, tokenizer, docs: Sequence[Mapping], *, steps: int, lr: float,
                       seed: int, batch_size: int, max_length: int = 256, weight_decay: float = 0.01,
                       progress: bool = True) -> list[float]:
    """Train all parameters of ``model`` as a language model on ``docs``; return the losses.

    A document is ``{"text": str}`` (every token counts; no special tokens added) or
    ``{"messages": [...]}`` (rendered with the chat template, every token counts). Padding does not.
    """
    from ..data.batches import IGNORE

    encoded = []
    for i, d in enumerate(docs):
        if "text" in d:
            text = d["text"]
        elif "messages" in d:
            text = tokenizer.apply_chat_template(list(d["messages"]), tokenize=False)
        else:
            raise InputError(f"pretraining document {i} has neither 'text' nor 'messages'")
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])[:max_length]
        if len(ids) >= 2:
            encoded.append(ids)
    if not encoded:
        raise InputError("no pretraining documents with at least two tokens")
    pad = tokenizer.pad_token_id

    def make_epoch(epoch: int):
        order = list(range(len(encoded)))
        random.Random(seed * 1000003 + epoch).shuffle(order)
        for s in range(0, len(order), batch_size):
            rows = [encoded[i] for i in order[s:s + batch_size]]
            n = max(map(len, rows))
            ids = torch.full((len(rows), n), pad, dtype=torch.long)
            att = torch.zeros((len(rows), n), dtype=torch.long)
            for j, r in enumerate(rows):
                ids[j, :len(r)] = torch.tensor(r)
                att[j, :len(r)] = 1
            yield {"input_ids": ids, "attention_mask": att, "labels": ids.masked_fill(att == 0, IGNORE)}

    torch.manual_seed(seed)
    return run_steps(model, make_epoch, steps=steps, lr=lr, weight_decay=weight_decay, desc="pretrain",
                     progress=progress)


def finetune_full(model: torch.nn.Module, tokenizer, row_groups: Sequence[Sequence[Mapping]], *, steps: int,
                  lr: float, seed: int, batch_size: int, max_length: int = 256, weight_decay: float = 0.01,
                  progress: bool = True, desc: str = "instruct", loss_weighting: str = "token") -> list[float]:
    """Supervised fine-tuning of all parameters on answers only; return the losses.

    ``row_groups``: groups of chat and/or MMLU rows (see sstmerge.data.batches), shuffled together;
    ``loss_weighting`` as in :func:`run_steps`.
    """
    from ..data.batches import batch_encoded, encode_rows

    encoded = [e for rows in row_groups if rows for e in encode_rows(tokenizer, list(rows), max_length)]
    torch.manual_seed(seed)
    return run_steps(model, lambda epoch: batch_encoded(tokenizer, encoded, batch_size, shuffle=True,
                                                        seed=seed * 1000003 + epoch),
                     steps=steps, lr=lr, weight_decay=weight_decay, desc=desc, progress=progress,
                     loss_weighting=loss_weighting)
