"""RegMean (Jin et al., 2023) in closed form on the input Gram matrices, inside the joint subspace.

Per layer, with the joint subspace ``(Q_in, Q_out)`` (:func:`sstmerge.adapters.joint_layer`), the
updates in it ``M_X = Q_out^T dX Q_in`` [m_o, m_i], and the projected input Grams
``A_X = Q_in^T (sum_t x_t x_t^T) Q_in`` taken on each adapter's own data and model (the ``A``
factor of a kfac Fisher with subspaces):

    M = (M_U (A_U + eps I) + alpha M_S A_S) (A_U + eps I + alpha A_S)^-1,
    eps = eps_rel * tr(A_U + A_S) / m_i,                  dM = Q_out M Q_in^T

which minimises ``sum_X w_X ||(W_X - W) X_X||^2`` (w_U = 1, w_S = alpha) with a ridge eps that
ties the merge to the utility update where neither data set has inputs. alpha = 0 gives dU exactly.
``offdiag`` scales the Grams' off-diagonal part (RegMean's reduction; 1.0 = plain Grams).
The result has rank <= m_i <= r_U + r_S and is written exactly.
"""

from __future__ import annotations

import torch

from ..adapters import joint_layer
from ..errors import InputError
from .core import Context, Method, factor_small, in_subspace
from .fisher_inputs import kfac_block

DEFAULTS = {"eps": 1e-4, "offdiag": 1.0, "rank": None}


def _fisher(_opts):
    return [("utility", "kfac"), ("safety", "kfac")]


def _reduce(A: torch.Tensor, c: float) -> torch.Tensor:
    if c == 1.0:
        return A
    d = torch.diag(torch.diagonal(A))
    return d + c * (A - d)


def run(ctx: Context, alpha: float, *, eps: float = 1e-4, offdiag: float = 1.0, rank: int | None = None):
    if ctx.fisher is None:
        raise InputError("regmean needs the input Grams (kfac Fisher) of both objectives: pass --fisher DIR or --safety-data/--utility-data")
    FU = ctx.fisher.get("utility", "kfac", "regmean")
    FS = ctx.fisher.get("safety", "kfac", "regmean")
    layers, diags = {}, {}
    for name in ctx.iterate("regmean"):
        u, s = ctx.pair(name)
        q_in, q_out = joint_layer(u, s)
        MU, MS = in_subspace(u, q_in, q_out), in_subspace(s, q_in, q_out)
        AU, _ = kfac_block(FU, name, q_in, q_out, "utility Fisher")
        AS, _ = kfac_block(FS, name, q_in, q_out, "safety Fisher")
        AU, AS = _reduce(AU, offdiag), _reduce(AS, offdiag)
        m_i = q_in.shape[1]
        ref = float(torch.trace(AU + AS)) / max(m_i, 1)
        if m_i and not ref > 0:
            raise InputError(f"regmean: the input Grams of layer {name} are zero; no data reached it (check the Fisher data)")
        AUe = AU + eps * ref * torch.eye(m_i, dtype=AU.dtype)
        K = AUe + alpha * AS
        R = MU @ AUe + alpha * (MS @ AS)
        M = torch.linalg.solve(K, R.T).T  # K symmetric: M = R K^-1
        f, info = factor_small(q_out, M, q_in, rank)
        layers[name] = f
        diags[name] = {"m_in": int(m_i), "m_out": int(q_out.shape[1]), **info,
                       "safety_gram_share": float(alpha * torch.trace(AS) / torch.trace(K)) if m_i else 0.0}
    return layers, {"layers": diags}


METHOD = Method("regmean", run, DEFAULTS, _fisher, doc=__doc__)
