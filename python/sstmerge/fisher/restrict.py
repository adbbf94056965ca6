"""Bounded forms of a diagonal Fisher ``F`` [O, I] of one layer's weight (DESIGN.md §10).

* :func:`restrict_diag` — ``F`` restricted to a subspace ``dW = q_out M q_in^T``:

      F_sub = K^T diag(vec F) K,   K = q_out ⊗ q_in   (row-major vec of M)          [n, n], n = m_o m_i
      F_sub[(a,b),(c,d)] = sum_{o,i} q_out[o,a] q_out[o,c] F[o,i] q_in[i,b] q_in[i,d]

  computed as ``P_out^T (F P_in)`` with ``P_in[i,(b,d)] = q_in[i,b] q_in[i,d]`` (b <= d only; the
  rest by symmetry) and ``P_out[o,(a,c)] = q_out[o,a] q_out[o,c]``, in fp64, over blocks of rows of
  F — never an I x m x O temporary (the largest is one [rows, I] fp64 block, bounded by ROW_BLOCK).
  The restriction is linear in F: the estimator restricts the sum once where the layers' [O, I]
  sums fit in memory, and otherwise each batch's Fisher as it is produced, never holding a full
  [O, I] accumulator (``DENSE_SUB_MAX_BYTES`` in :mod:`sstmerge.fisher.estimator`).

* :func:`pool_shape` / :func:`pool_mean` / :func:`unpool_rows` — the block-mean of F over
  (po x pi) tiles, with (po, pi) the smallest powers of two (doubled on the side with more
  remaining blocks) that bring the tile count to at most ``max_entries``; the Fisher of a tile's
  weights is taken as the tile's mean. Exact (pool (1, 1)) for every layer with O I <= max_entries.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

#: Rows of F converted to fp64 at a time in :func:`restrict_diag` (a [ROW_BLOCK, I] fp64 block).
ROW_BLOCK = 512


def _pair_products(q: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``P[:, j] = q[:, b_j] * q[:, d_j]`` for the pairs b_j <= d_j, and the index vectors."""
    m = q.shape[1]
    b, d = torch.triu_indices(m, m, device=q.device)
    return q[:, b] * q[:, d], b, d


def restrict_diag(F: Tensor, q_in: Tensor, q_out: Tensor) -> Tensor:
    """``K^T diag(vec F) K`` [m_o m_i, m_o m_i] in fp64 on F's device (see the module docstring)."""
    O, I = F.shape
    qi = q_in.to(F.device, torch.float64)
    qo = q_out.to(F.device, torch.float64)
    m_i, m_o = qi.shape[1], qo.shape[1]
    P_in, b, d = _pair_products(qi)    # [I, p_i], p_i = m_i (m_i + 1) / 2
    P_out, a, c = _pair_products(qo)   # [O, p_o]
    acc = torch.zeros(P_out.shape[1], P_in.shape[1], dtype=torch.float64, device=F.device)
    for r0 in range(0, O, ROW_BLOCK):
        r1 = min(O, r0 + ROW_BLOCK)
        T = F[r0:r1].to(torch.float64) @ P_in           # [rows, p_i]
        acc.addmm_(P_out[r0:r1].T, T)                    # [p_o, p_i]
        del T
    # expand the (a <= c, b <= d) pairs to the full [m_o, m_i, m_o, m_i] tensor by symmetry
    full = torch.zeros(m_o, m_o, m_i, m_i, dtype=torch.float64, device=F.device)
    full[a[:, None], c[:, None], b[None, :], d[None, :]] = acc
    full[c[:, None], a[:, None], b[None, :], d[None, :]] = acc
    full[a[:, None], c[:, None], d[None, :], b[None, :]] = acc
    full[c[:, None], a[:, None], d[None, :], b[None, :]] = acc
    n = m_o * m_i
    return full.permute(0, 2, 1, 3).reshape(n, n)        # [(a, b), (c, d)]


def pool_shape(O: int, I: int, max_entries: int | None) -> tuple[int, int]:
    """The tile (po, pi): (1, 1) when ``O * I <= max_entries`` (or no limit), else powers of two,
    doubling the side with more tiles left, until ``ceil(O/po) * ceil(I/pi) <= max_entries``."""
    if max_entries is None or O * I <= max_entries:
        return 1, 1
    po = pi = 1
    while math.ceil(O / po) * math.ceil(I / pi) > max_entries:
        if math.ceil(O / po) >= math.ceil(I / pi):
            po *= 2
        else:
            pi *= 2
    return po, pi


def pool_sum(F: Tensor, po: int, pi: int) -> Tensor:
    """Tile sums [ceil(O/po), ceil(I/pi)] of F (edge tiles may be smaller)."""
    if (po, pi) == (1, 1):
        return F
    O, I = F.shape
    Ob, Ib = math.ceil(O / po), math.ceil(I / pi)
    out = torch.zeros(Ob, Ib, dtype=F.dtype, device=F.device)
    for r in range(po):  # strided rows: no padded copy of F
        rows = F[r::po]
        s = torch.nn.functional.pad(rows, (0, Ib * pi - I)).reshape(rows.shape[0], Ib, pi).sum(-1)
        out[: rows.shape[0]] += s
    return out


def tile_counts(O: int, I: int, po: int, pi: int, device=None) -> Tensor:
    """Number of entries of F in each tile [ceil(O/po), ceil(I/pi)] (fp32)."""
    ro = torch.full((math.ceil(O / po),), float(po), device=device)
    ri = torch.full((math.ceil(I / pi),), float(pi), device=device)
    ro[-1] = O - po * (ro.numel() - 1)
    ri[-1] = I - pi * (ri.numel() - 1)
    return torch.outer(ro, ri)


def unpool_rows(P: Tensor, po: int, pi: int, I: int, r0: int, r1: int) -> Tensor:
    """Rows r0:r1 of the [O, I] matrix whose entries are their tile's value in P (fp32)."""
    if (po, pi) == (1, 1):
        return P[r0:r1]
    rows = P[torch.arange(r0, r1, device=P.device) // po]
    return rows.repeat_interleave(pi, dim=1)[:, :I]
