"""torch.distributed reduction of Fisher accumulators.

When ``torch.distributed`` is initialised, every rank estimates on its own shard of the data and the
accumulators (sums over samples / tokens) are all-reduced with SUM, so N ranks over N shards give
the single-process result. The sample and token counts are summed the same way, and the data hash
is the hash of every rank's data hash in rank order. Every rank ends with the full result.
"""

from __future__ import annotations

import hashlib

import torch


def active() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    return torch.distributed.get_rank() if active() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if active() else 1


def all_reduce_sum_(tensors: list[torch.Tensor]) -> None:
    """In place: each tensor becomes the sum over ranks (no-op without torch.distributed)."""
    if not active():
        return
    for t in tensors:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)


def sum_ints(values: list[int], device: torch.device) -> list[int]:
    if not active():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return [int(v) for v in t.tolist()]


def all_true(flag: bool, device: torch.device) -> bool:
    """True when ``flag`` is true on every rank."""
    if not active():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return bool(t.item() == 1.0)


def raise_if_any_failed(failed: bool, device: torch.device, what: str) -> None:
    """Collective: every rank says whether its part of ``what`` failed. Called after the part, on
    success and on failure, it keeps a rank that raised from leaving the others in the next
    all-reduce (a lost connection under gloo, a hang until the watchdog timeout under NCCL). A failed rank returns (and then re-raises its own error); the others raise
    a RuntimeError naming the failed ranks. No-op without torch.distributed."""
    if not active():
        return
    t = torch.zeros(world_size(), dtype=torch.float64, device=device)
    t[rank()] = 1.0 if failed else 0.0
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    bad = [r for r, v in enumerate(t.tolist()) if v]
    if bad and not failed:
        raise RuntimeError(f"{what} failed on rank(s) {', '.join(map(str, bad))} (see the error "
                           f"there); rank {rank()} finished its shard and stops too")


def combine_hashes(h: str) -> str:
    """The hash of every rank's ``h`` in rank order (``h`` itself without torch.distributed)."""
    if not active():
        return h
    parts = [None] * world_size()
    torch.distributed.all_gather_object(parts, h)
    return hashlib.sha256("|".join(parts).encode()).hexdigest()
