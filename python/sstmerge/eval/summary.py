"""Scores of one evaluation with a 95% interval.

The interval is Wilson's score interval for a binomial proportion (z = 1.959964): it stays inside
[0, 1], behaves at 0 and n, and is close to nominal coverage at small n, unlike the normal
approximation. It is the interval of *one* model's score; comparisons of two models on the same items
(paired bootstrap, McNemar) belong to ``sstmerge.stats``.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Iterable, Mapping

Z95 = 1.959963984540054


def wilson_interval(count: int, n: int, z: float = Z95) -> tuple[float, float]:
    if n <= 0:
        raise ValueError("a proportion over zero items has no interval")
    if not 0 <= count <= n:
        raise ValueError(f"count {count} outside 0..{n}")
    p = count / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def summarize(records: Iterable[Mapping], key: str) -> dict:
    """``{score, n, count, ci95: [lo, hi], interval: "wilson"}`` for the boolean field ``key``
    ("correct" for MMLU, "refused" for refusal and over-refusal)."""
    values = [r[key] for r in records]
    for v in values:
        if not isinstance(v, bool):
            raise TypeError(f"record field {key!r} must be bool, got {type(v).__name__}")
    n = len(values)
    if n == 0:
        raise ValueError("no records to summarise")
    count = sum(values)
    lo, hi = wilson_interval(count, n)
    return {"score": count / n, "n": n, "count": count, "ci95": [lo, hi], "interval": "wilson"}


def per_subject(records: Iterable[Mapping], key: str = "correct") -> dict[str, dict]:
    """MMLU breakdown: :func:`summarize` per subject, subjects sorted."""
    groups: dict[str, list] = defaultdict(list)
    for r in records:
        groups[r["subject"]].append(r)
    return {s: summarize(groups[s], key) for s in sorted(groups)}
