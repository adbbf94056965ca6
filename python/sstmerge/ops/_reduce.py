"""Deterministic reductions shared by the GPU glue modules (_cuda, _triton)."""

from __future__ import annotations

import torch
from torch import Tensor


def sum_splits(parts: Tensor) -> Tensor:
    """Sum over dim 0 by pairwise halving. Only elementwise adds, so every entry is summed in the
    same order: deterministic, and a stack of symmetric matrices gives a bitwise-symmetric sum
    (torch's reduction kernels do not promise either)."""
    while parts.shape[0] > 1:
        h = parts.shape[0] // 2
        head = parts[:h] + parts[h : 2 * h]
        parts = torch.cat([head, parts[2 * h :]]) if parts.shape[0] % 2 else head
    return parts[0]
