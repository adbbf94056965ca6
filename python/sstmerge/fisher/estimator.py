"""Fisher estimation on transformers causal LMs (optionally peft LoRA models).

Notation. A batch holds B sequences of T tokens; ``am[b, t]`` is the attention mask (1 = a real
token, 0 = padding) and ``labels`` follow the Hugging Face convention (``-100`` = not counted; the
label at position t+1 is predicted from position t). The per-sample loss is

    L_b = - sum_{t : labels[b, t+1] != -100} log p(labels[b, t+1] | tokens[b, <= t])

(positions where ``am == 0`` never count). For a target linear layer with input x[b, t] and
gradient g[b, t] = dL_b / d(output[b, t]), the per-sample weight gradient is

    G_b = sum_t am[b, t] g[b, t]^T x[b, t]                                          [O, I]

over ALL real positions t: prompt positions have no loss of their own but a nonzero output-gradient
through attention; padding positions have an exactly zero one. So the op mask is the attention
mask, not the label mask. All sums below are over the samples / real tokens of all batches (and of
all ranks under torch.distributed).

kind="diag"      F[p] = sum_b G_b[p]^2 for every weight p of the target parameters, keyed by the
                 parameter's name in ``model.named_parameters()`` and shaped like it. target="lora":
                 the lora_A and lora_B weights (G_b of lora_A from its input x and output-gradient;
                 of lora_B from lora_A's output and the gradient at lora_B's output, which includes
                 the LoRA scaling); target="linear": the base weights of the target layers.
                 Bounded forms (target="linear", :mod:`sstmerge.fisher.restrict`), for models whose
                 [O, I] accumulators would not fit (DESIGN.md §10):
                 * with ``subspaces``: F restricted to the layer's subspace,
                   "<layer>.fisher" = K^T diag(vec F) K [n, n] (K = q_out ⊗ q_in, n = m_o m_i), plus
                   "<layer>.q_in", "<layer>.q_out". The restriction is linear in F: when the layers'
                   fp32 [O, I] sums fit DENSE_SUB_MAX_BYTES they are summed and restricted once,
                   otherwise each batch's F is restricted as it is produced (no [O, I] accumulator);
                 * with ``pool_max=N``: a layer with O I > N keeps the mean of F over (po x pi)
                   tiles [ceil(O/po), ceil(I/pi)] under its parameter name; meta "pool" maps the
                   parameter name to [po, pi] (layers with O I <= N are exact).
kind="subspace"  with ``subspaces[layer] = (q_in [I, m_i], q_out [O, m_o])`` (orthonormal columns)
                 and G_b taken w.r.t. the layer's *effective* weight (x = the whole module's input,
                 g = the gradient at its output, base + LoRA path):
                     S_b = q_out^T G_b q_in                                          [m_o, m_i]
                     "<layer>.fisher" = sum_b vec(S_b) vec(S_b)^T, vec row-major    [m_o m_i, m_o m_i]
                 the exact Fisher of dW = q_out M q_in^T in coordinates vec(M); plus "<layer>.q_in",
                 "<layer>.q_out".
kind="kfac"      Kronecker factors of the effective weight, over real tokens:
                     "<layer>.A" = sum_{b,t} am x x^T       [I, I]
                     "<layer>.G" = sum_{b,t} am g g^T       [O, O]
                 with ``subspaces``: (q_in^T x)(q_in^T x)^T [m_i, m_i] and (q_out^T g)(...)^T
                 [m_o, m_o], and "<layer>.q_in" / ".q_out" stored. With ``sketch_dim=l`` and no
                 subspace, a layer with max(I, O) > DENSE_MAX_WIDTH gets instead
                     "<layer>.A_sketch" = sum am x (x^T omega_in)   [I, l]
                     "<layer>.G_sketch" = sum am g (g^T omega_out)  [O, l]
                 with seeded standard-Gaussian "<layer>.omega_in" [I, l], "<layer>.omega_out" [O, l]
                 (the seed derives from ``seed`` and the layer name).

fisher="empirical" uses the data's labels. fisher="true" replaces every counted label by a token
sampled from the model's own predictive distribution at that position, ``samples`` = K times
(torch.Generator seeded by ``seed``, plus the rank under torch.distributed), and averages the K
Fishers, so it is on the scale of the empirical one: F = (1/K) sum_k sum_b G_bk (x) G_bk.

reduction="sum" returns the sums above; reduction="mean" divides every accumulated tensor by
n_samples (the number of sequences).

Mechanics: one forward and one backward per batch (K backwards for the true Fisher), shared by
every estimate of one :func:`estimate_many` call: forward hooks
record each target site's input and output tensor; ``torch.autograd.grad`` gives the gradients at
the outputs (no parameter ``.grad`` is touched, no weight gradient is computed); the sstmerge ops
(``diag_fisher_linear``, ``subspace_grads``, ``kfac_factor``, ``kfac_sketch``) do the per-sample
work, so no per-sample gradient of a base weight is ever held. The model runs in eval mode (dropout
off) and its train/eval flags are restored afterwards.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import math
import os
from typing import Any, Iterable, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..errors import InputError
from ..ops.backends import resolve as resolve_backend
from . import cache as _cache
from . import distributed as dist
from .hooks import Capture, Layer, base_sites, find_layers, is_peft_model, lora_sites, module_sites
from .restrict import pool_shape, pool_sum, restrict_diag, tile_counts
from .result import FisherResult, tensor_bytes

DENSE_MAX_WIDTH = 4096  # kfac with sketch_dim: layers wider than this are sketched
#: diag with subspaces: when the subspace layers' fp32 [O, I] sums take at most this much memory in all,
#: they are summed over the batches and restricted once; otherwise each batch's F is restricted as it
#: comes (the bounded form for 7-14B models, DESIGN.md §10). The same numbers up to fp32 round-off.
DENSE_SUB_MAX_BYTES = 1 << 30
ORTHONORMAL_TOL = 1e-3
IGNORE = -100
_FORMAT_OPTIONS = 1  # bump when the meaning of a stored estimate changes


class NonFiniteError(InputError, FloatingPointError):
    """A NaN or Inf in a captured gradient or input (names the layer and the batch)."""


# ----------------------------------------------------------------------------- options


def _check_options(kind, target, fisher, samples, reduction, sketch_dim, subspaces, meta, pool_max=None):
    def one_of(name, v, allowed):
        if v not in allowed:
            raise InputError(f"{name} must be one of {allowed}, got {v!r}")

    one_of("kind", kind, ("diag", "subspace", "kfac"))
    one_of("target", target, ("lora", "linear"))
    one_of("fisher", fisher, ("empirical", "true"))
    one_of("reduction", reduction, ("sum", "mean"))
    if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
        raise InputError(f"samples must be a positive int, got {samples!r}")
    if fisher == "empirical" and samples != 1:
        raise InputError("samples (label draws) applies to fisher='true' only; leave it at 1")
    if sketch_dim is not None:
        if kind != "kfac":
            raise InputError("sketch_dim applies to kind='kfac' only")
        if not isinstance(sketch_dim, int) or isinstance(sketch_dim, bool) or sketch_dim < 1:
            raise InputError(f"sketch_dim must be a positive int, got {sketch_dim!r}")
    if kind == "subspace" and not subspaces:
        raise InputError("kind='subspace' needs subspaces={layer: (q_in, q_out)}")
    if kind == "diag" and subspaces and target != "linear":
        raise InputError("subspaces with kind='diag' restrict the base weights' Fisher: they need target='linear'")
    if pool_max is not None:
        if kind != "diag" or target != "linear":
            raise InputError("pool_max applies to kind='diag' with target='linear' only")
        if subspaces:
            raise InputError("pool_max and subspaces are two bounded forms of the diag Fisher: give one")
        if not isinstance(pool_max, int) or isinstance(pool_max, bool) or pool_max < 1:
            raise InputError(f"pool_max must be a positive int, got {pool_max!r}")
    if meta is not None and (
        not isinstance(meta, Mapping)
        or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    ):
        raise InputError("meta must be a dict of str -> str")


def _check_subspaces(subspaces, layers: list[Layer]) -> dict[str, tuple[Tensor, Tensor]]:
    """Validated fp32 CPU copies of the subspace bases, restricted to (and ordered as) ``layers``."""
    by_name = {L.name: L for L in layers}
    unknown = [k for k in subspaces if k not in by_name]
    if unknown:
        shown = ", ".join(list(by_name)[:6]) + (", ..." if len(by_name) > 6 else "")
        raise InputError(f"subspaces name layers that are not target layers: {unknown[:4]}; "
                         f"target layers are {shown}")
    out = {}
    for L in layers:
        if L.name not in subspaces:
            continue
        pair = subspaces[L.name]
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise InputError(f"subspaces[{L.name!r}] must be a pair (q_in, q_out)")
        qs = []
        for what, q, d in (("q_in", pair[0], L.in_features), ("q_out", pair[1], L.out_features)):
            if not isinstance(q, Tensor) or q.dim() != 2 or q.shape[0] != d or not 1 <= q.shape[1] <= d:
                shape = tuple(q.shape) if isinstance(q, Tensor) else type(q).__name__
                raise InputError(f"subspaces[{L.name!r}] {what} must be a [{d}, m] tensor with "
                                 f"1 <= m <= {d}, got {shape}")
            q = q.detach().to("cpu", torch.float32).contiguous()
            err = (q.T @ q - torch.eye(q.shape[1])).abs().max().item()
            if not err <= ORTHONORMAL_TOL:
                raise InputError(f"subspaces[{L.name!r}] {what} does not have orthonormal columns "
                                 f"(max |q^T q - I| = {err:.2e}); orthonormalise it (torch.linalg.qr)")
            qs.append(q)
        out[L.name] = (qs[0], qs[1])
    return out


def _omega(seed: int, layer: str, side: str, d: int, l: int) -> Tensor:
    s = int.from_bytes(hashlib.sha256(f"{seed}|{layer}|{side}".encode()).digest()[:8], "little")
    gen = torch.Generator().manual_seed(s & ((1 << 63) - 1))
    return torch.randn(d, l, generator=gen, dtype=torch.float32)


# ----------------------------------------------------------------------------- accumulators


class _Plan:
    """The sites to hook and, per site, how a batch's (x, g, mask) adds to the accumulators."""

    def __init__(self, model, kind, target, layers, subspaces, sketch_dim, seed, backend, pool_max=None):
        # every accumulator lives on its own layer's device (a model split by device_map="auto"
        # puts layers on several GPUs; x and g of a layer arrive on that layer's device)
        self.kind, self.backend = kind, backend
        self.acc: dict[str, Tensor] = {}
        self.extra: dict[str, Tensor] = {}  # stored as they are (bases, omegas)
        self.pools: dict[str, tuple[int, int]] = {}  # diag with pool_max: param name -> (po, pi)
        # diag with subspaces: key -> (fp32 [O, I] sum, (q_in, q_out)), restricted once by flush_dense
        self.dense: dict[str, tuple[Tensor, tuple[Tensor, Tensor]]] = {}
        self.updates = []  # per site: callable(x, g, mask, weight)
        if kind == "diag":
            self.sites = lora_sites(model, layers) if target == "lora" else base_sites(model, layers)
            dense_sub = bool(subspaces) and 4 * sum(
                math.prod(s.weight_shape) for s in self.sites if s.layer in subspaces) <= DENSE_SUB_MAX_BYTES
            for s in self.sites:
                device = site_device(s.module)
                q = subspaces.get(s.layer) if subspaces else None
                if q is not None:
                    key = f"{s.layer}.fisher"
                    self.extra[f"{s.layer}.q_in"], self.extra[f"{s.layer}.q_out"] = q
                    n = q[0].shape[1] * q[1].shape[1]
                    self.acc[key] = torch.zeros(n, n, dtype=torch.float64, device=device)
                    q = tuple(t.to(device) for t in q)
                    if dense_sub:
                        self.dense[key] = (torch.zeros(s.weight_shape, dtype=torch.float32, device=device), q)
                        self.updates.append(self._diag(key, self.dense[key][0]))
                    else:
                        self.updates.append(self._diag_sub(key, *q))
                    continue
                po, pi = pool_shape(*s.weight_shape, pool_max)
                if (po, pi) != (1, 1):
                    self.pools[s.param_name] = (po, pi)
                    O, I = s.weight_shape
                    self.acc[s.param_name] = torch.zeros(-(-O // po), -(-I // pi), dtype=torch.float32, device=device)
                    self.updates.append(self._diag_pool(s.param_name, po, pi))
                    continue
                self.acc[s.param_name] = torch.zeros(s.weight_shape, dtype=torch.float32, device=device)
                self.updates.append(self._diag(s.param_name))
            return
        self.sites = module_sites(layers)
        for L in layers:
            device = site_device(L.module)
            q = subspaces.get(L.name)
            if q is not None:
                q_in, q_out = (t.to(device) for t in q)
                self.extra[f"{L.name}.q_in"], self.extra[f"{L.name}.q_out"] = q
            if kind == "subspace":
                n = q_in.shape[1] * q_out.shape[1]
                key = f"{L.name}.fisher"
                self.acc[key] = torch.zeros(n, n, dtype=torch.float32, device=device)
                self.updates.append(self._subspace(key, q_in, q_out))
            elif q is not None:
                self._alloc_kfac(L.name, q_in.shape[1], q_out.shape[1], device)
                self.updates.append(self._kfac(L.name, q_in, q_out))
            elif sketch_dim is not None and max(L.in_features, L.out_features) > DENSE_MAX_WIDTH:
                w_in = _omega(seed, L.name, "in", L.in_features, sketch_dim)
                w_out = _omega(seed, L.name, "out", L.out_features, sketch_dim)
                self.extra[f"{L.name}.omega_in"], self.extra[f"{L.name}.omega_out"] = w_in, w_out
                self.acc[f"{L.name}.A_sketch"] = torch.zeros(L.in_features, sketch_dim, device=device)
                self.acc[f"{L.name}.G_sketch"] = torch.zeros(L.out_features, sketch_dim, device=device)
                self.updates.append(self._sketch(L.name, w_in.to(device), w_out.to(device)))
            else:
                self._alloc_kfac(L.name, L.in_features, L.out_features, device)
                self.updates.append(self._kfac(L.name, None, None))

    def _alloc_kfac(self, name, di, do, device):
        self.acc[f"{name}.A"] = torch.zeros(di, di, dtype=torch.float32, device=device)
        self.acc[f"{name}.G"] = torch.zeros(do, do, dtype=torch.float32, device=device)

    def _diag(self, key, into: Tensor | None = None):
        acc = self.acc[key] if into is None else into

        def up(x, g, mask, w):
            acc.add_(ops.diag_fisher_linear(x, g, mask, backend=self.backend), alpha=w)
        return up

    def _diag_sub(self, key, q_in, q_out):
        def up(x, g, mask, w):
            F = ops.diag_fisher_linear(x, g, mask, backend=self.backend)  # this batch's [O, I]
            self.acc[key].add_(restrict_diag(F, q_in, q_out), alpha=w)
        return up

    def _diag_pool(self, key, po, pi):
        def up(x, g, mask, w):
            F = ops.diag_fisher_linear(x, g, mask, backend=self.backend)
            self.acc[key].add_(pool_sum(F, po, pi), alpha=w)
        return up

    def flush_dense(self) -> None:
        """Restrict each dense diag_sub sum once (exact: the restriction is linear in F) and free it."""
        for key, (F, q) in self.dense.items():
            self.acc[key].add_(restrict_diag(F, *q))
        self.dense.clear()

    def finish_pools(self) -> None:
        """Tile sums -> tile means (after the reduction over batches and ranks)."""
        for name, (po, pi) in self.pools.items():
            O, I = self.weight_shapes[name]
            self.acc[name].div_(tile_counts(O, I, po, pi, self.acc[name].device))

    @property
    def weight_shapes(self) -> dict[str, tuple]:
        return {s.param_name: s.weight_shape for s in self.sites}

    def _subspace(self, key, q_in, q_out):
        def up(x, g, mask, w):
            s = ops.subspace_grads(x, g, q_in, q_out, mask, backend=self.backend)
            v = s.reshape(s.shape[0], -1)  # vec row-major
            self.acc[key].addmm_(v.T, v, alpha=w)
        return up

    def _kfac(self, name, q_in, q_out):
        def up(x, g, mask, w):
            # A does not depend on the label draw: count it once per batch (w carries 1/K per draw).
            self.acc[f"{name}.A"].add_(ops.kfac_factor(x, mask, q_in, backend=self.backend), alpha=w)
            self.acc[f"{name}.G"].add_(ops.kfac_factor(g, mask, q_out, backend=self.backend), alpha=w)
        return up

    def _sketch(self, name, w_in, w_out):
        def up(x, g, mask, w):
            self.acc[f"{name}.A_sketch"].add_(ops.kfac_sketch(x, w_in, mask, backend=self.backend), alpha=w)
            self.acc[f"{name}.G_sketch"].add_(ops.kfac_sketch(g, w_out, mask, backend=self.backend), alpha=w)
        return up


# ----------------------------------------------------------------------------- data


def _prepare(batch: Any, index: int, device, accepts_pos: bool):
    if not isinstance(batch, Mapping):
        raise InputError(f"batch {index} is a {type(batch).__name__}; batches must be dicts with "
                         "input_ids, attention_mask and labels")
    for k in ("input_ids", "labels"):
        if k not in batch:
            raise InputError(f"batch {index} has no {k!r} (keys: {sorted(batch)})")
    ids = torch.as_tensor(batch["input_ids"])
    labels = torch.as_tensor(batch["labels"])
    am = batch.get("attention_mask")
    am = torch.ones_like(ids) if am is None else torch.as_tensor(am)
    if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
        raise InputError(f"batch {index}: input_ids must be an integer [B, T] tensor, got "
                         f"{ids.dtype} {tuple(ids.shape)}")
    if labels.shape != ids.shape or am.shape != ids.shape:
        raise InputError(f"batch {index}: input_ids {tuple(ids.shape)}, attention_mask "
                         f"{tuple(am.shape)} and labels {tuple(labels.shape)} must have one shape")
    ids, labels, am = ids.to(device).long(), labels.to(device).long(), am.to(device).long()
    labels = labels.masked_fill(am == 0, IGNORE)  # padding never counts
    kw = {"input_ids": ids, "attention_mask": am, "use_cache": False}
    if "position_ids" in batch:
        kw["position_ids"] = torch.as_tensor(batch["position_ids"]).to(device).long()
    elif accepts_pos:  # left padding: real tokens keep the positions they have unpadded
        kw["position_ids"] = (am.cumsum(-1) - 1).clamp(min=0)
    return kw, am, labels


def _batch_hash(h, kw, labels) -> None:
    for name, t in (("input_ids", kw["input_ids"]), ("attention_mask", kw["attention_mask"]),
                    ("labels", labels)):
        h.update(f"{name}|{tuple(t.shape)}|".encode())
        h.update(tensor_bytes(t.long()))


def _accepts(model, name: str) -> bool:
    """Whether the (base) model's forward takes the keyword ``name``."""
    base = model.get_base_model() if is_peft_model(model) else model
    try:
        return name in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False


def _counted_logits(model, kw: dict, counted: Tensor, keep: bool) -> Tensor:
    """The logits of the counted positions, [N, V] (N = counted.sum(); counted [B, T-1] marks the
    positions whose next token is a label). With ``keep`` (the model takes transformers'
    ``logits_to_keep``), the output head runs only on the positions counted in some sample of the
    batch: prompt and padding positions skip the [*, d] x [d, V] product and the [B, T, V] logits
    never exist. Positions are per batch (one index list for every sample), as every transformers
    version since 4.50 supports."""
    if not keep:
        return model(**kw).logits[:, :-1][counted]
    pos = counted.any(0).nonzero().squeeze(1)  # [P], ascending
    logits = model(**kw, logits_to_keep=pos).logits  # [B, P, V]
    return logits[counted[:, pos]]


def _model_device(model) -> torch.device:
    """Where the inputs go: the input embeddings' device (the first stage of a split model)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    p = getattr(emb, "weight", None) if emb is not None else None
    if p is None:
        p = next(model.parameters(), None)
    if p is None:
        raise InputError("the model has no parameters")
    return p.device


def site_device(module: nn.Module) -> torch.device:
    """The device of a layer's (first) weight: where its inputs and output-gradients arrive."""
    w = getattr(module, "weight", None)
    if isinstance(w, Tensor):
        return w.device
    p = next(module.parameters(), None)
    if p is None:
        raise InputError(f"layer {type(module).__name__} has no parameters")
    return p.device


# ----------------------------------------------------------------------------- memory


class _PeakMemory:
    """Peak memory of the run: torch.cuda.max_memory_allocated on CUDA; on CPU the process's
    resident-set high-water mark (VmHWM), reset at the start via /proc/self/clear_refs when allowed."""

    def __init__(self, device):
        self.device = device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            self.source = "torch.cuda.max_memory_allocated"
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.source = "process peak RSS (VmHWM) during the estimate"
        except OSError:
            self.source = "process peak RSS (VmHWM) since process start"

    def peak(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        import resource
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


# ----------------------------------------------------------------------------- estimate


def estimate(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    *,
    kind: str = "diag",
    target: str = "lora",
    fisher: str = "empirical",
    samples: int = 1,
    seed: int = 0,
    subspaces: Optional[Mapping[str, tuple[Tensor, Tensor]]] = None,
    target_modules: Optional[Sequence[str]] = None,
    sketch_dim: Optional[int] = None,
    reduction: str = "sum",
    backend: str = "auto",
    progress: bool = True,
    cache_dir: Optional[str | os.PathLike] = None,
    meta: Optional[Mapping[str, str]] = None,
    pool_max: Optional[int] = None,
) -> FisherResult:
    """Estimate the Fisher of ``model`` on ``batches`` (definitions in the module docstring).

    model: a transformers causal LM, optionally a peft model. batches: an iterable of dicts with
    ``input_ids``, ``attention_mask`` (optional, all ones) and ``labels`` ([B, T] each).
    Returns a :class:`FisherResult` with fp32 CPU tensors. Raises InputError for bad options,
    missing target layers, empty data, and (as NonFiniteError) a NaN/Inf gradient or input.
    """
    common = _Common(fisher, samples, seed, reduction, backend)
    job = _job(model, common, dict(kind=kind, target=target, subspaces=subspaces, target_modules=target_modules,
                                   sketch_dim=sketch_dim, meta=meta, pool_max=pool_max))
    if cache_dir is None:
        return _estimate_jobs(model, batches, [job], common, progress)[0]
    device = _model_device(model)
    accepts_pos = _accepts(model, "position_ids")
    batches = list(batches)
    h = hashlib.sha256()
    for i, b in enumerate(batches):
        kw, _, labels = _prepare(b, i, "cpu", accepts_pos)
        _batch_hash(h, kw, labels)
    data_h = dist.combine_hashes(h.hexdigest())
    model_h = _cache.model_hash(model, _cache.describe(model))
    entry = _cache.path_for(cache_dir, _cache.key(model_h, data_h, job.options))
    hit = _cache.load(entry)
    if dist.all_true(hit is not None, device):
        hit.meta.update(dict(meta or {}))
        hit.meta["cache"] = f"hit {entry}"
        return hit
    result = _estimate_jobs(model, batches, [job], common, progress)[0]
    result.meta["model_hash"] = model_h
    if dist.rank() == 0:
        result.save(entry)
    result.meta["cache"] = f"miss {entry}"
    return result


#: The keys of one request to :func:`estimate_many` (the per-estimate options of :func:`estimate`).
SPEC_KEYS = ("kind", "target", "subspaces", "target_modules", "sketch_dim", "meta", "pool_max")


def estimate_many(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    specs: Sequence[Mapping[str, Any]],
    *,
    fisher: str = "empirical",
    samples: int = 1,
    seed: int = 0,
    reduction: str = "sum",
    backend: str = "auto",
    progress: bool = True,
    desc: Optional[str] = None,
) -> list[FisherResult]:
    """Several estimates from **one** forward and backward per batch: ``specs[j]`` holds
    :data:`SPEC_KEYS` options (as :func:`estimate`'s); result j is ``estimate(model, batches, **specs[j],
    fisher=..., ...)`` (the same sums; every site of every spec is hooked in the same pass). The
    estimates share the label draws of ``fisher="true"``. Each result's ``peak_memory_bytes`` is the
    joint pass's. ``desc`` labels the progress bar."""
    if isinstance(specs, Mapping) or not specs:
        raise InputError("specs must be a non-empty list of dicts of estimate options (kind, target, ...)")
    common = _Common(fisher, samples, seed, reduction, backend)
    jobs = []
    for j, spec in enumerate(specs):
        unknown = sorted(set(spec) - set(SPEC_KEYS)) if isinstance(spec, Mapping) else None
        if unknown is None or unknown:
            raise InputError(f"specs[{j}] must be a dict with keys among {SPEC_KEYS}"
                             + (f"; got unknown {unknown}" if unknown else ""))
        jobs.append(_job(model, common, spec))
    return _estimate_jobs(model, batches, jobs, common, progress, desc)


@dataclasses.dataclass(frozen=True)
class _Common:
    """The options every estimate of one pass shares."""

    fisher: str
    samples: int
    seed: int
    reduction: str
    backend: str


@dataclasses.dataclass
class _Job:
    """One requested estimate: its validated options, target layers and subspaces."""

    kind: str
    target: str
    layers: list
    subs: dict
    sketch_dim: Optional[int]
    pool_max: Optional[int]
    meta: Optional[Mapping[str, str]]
    options: dict


def _job(model, c: _Common, spec: Mapping[str, Any]) -> _Job:
    kind, target = spec.get("kind", "diag"), spec.get("target", "lora")
    subspaces, sketch_dim, pool_max = spec.get("subspaces"), spec.get("sketch_dim"), spec.get("pool_max")
    target_modules, meta = spec.get("target_modules"), spec.get("meta")
    _check_options(kind, target, c.fisher, c.samples, c.reduction, sketch_dim, subspaces, meta, pool_max)
    layers = find_layers(model, target, target_modules)
    subs = _check_subspaces(subspaces, layers) if subspaces else {}
    if subs:
        layers = [L for L in layers if L.name in subs]
    options = {
        "format": _FORMAT_OPTIONS, "kind": kind, "target": target, "fisher": c.fisher,
        "samples": c.samples, "seed": c.seed, "reduction": c.reduction, "sketch_dim": sketch_dim,
        "dense_max_width": DENSE_MAX_WIDTH if sketch_dim is not None else None,
        "target_modules": list(target_modules) if target_modules is not None else None,
        "layers": [L.name for L in layers],
        "subspaces": _subspace_hash(subs) if subs else None,
        **({"pool_max": pool_max} if pool_max is not None else {}),
    }
    return _Job(kind, target, layers, subs, sketch_dim, pool_max, meta, options)


class _Joint:
    """The sites of several plans, each module hooked once, and per hooked site the updates of every
    plan that reads it. A base Linear inside a LoRA layer that another plan hooks whole is read from
    that layer's capture: its input is the layer's input and the gradient at its output equals the
    gradient at the layer's output (:mod:`sstmerge.fisher.hooks`), so the pass holds no extra tensors."""

    def __init__(self, plans: list[_Plan]):
        whole = {}  # id(base Linear) -> the hooked LoRA layer wrapping it
        for p in plans:
            for s in p.sites:
                base = getattr(s.module, "get_base_layer", None)
                if base is not None and s.param_name is None:
                    whole[id(base())] = s.module
        self.sites, routed = [], {}
        for p in plans:
            for s, up in zip(p.sites, p.updates):
                module = whole.get(id(s.module), s.module)
                if id(module) not in routed:
                    routed[id(module)] = []
                    self.sites.append(s if module is s.module else dataclasses.replace(s, module=module))
                routed[id(module)].append(up)
        self.updates = [self._all(routed[id(s.module)]) for s in self.sites]

    @staticmethod
    def _all(ups):
        if len(ups) == 1:
            return ups[0]

        def up(x, g, mask, w):
            for u in ups:
                u(x, g, mask, w)
        return up


def _estimate_jobs(model, batches, jobs: list[_Job], c: _Common, progress: bool,
                   desc: Optional[str] = None) -> list[FisherResult]:
    if torch.is_inference_mode_enabled():
        raise InputError("estimate needs autograd: call it outside torch.inference_mode()")
    device = _model_device(model)
    resolved = resolve_backend(c.backend, device)  # fails early for an unusable explicit backend
    accepts_pos = _accepts(model, "position_ids")
    described = _cache.describe(model)
    plans = [_Plan(model, j.kind, j.target, j.layers, j.subs, j.sketch_dim, c.seed, c.backend, j.pool_max)
             for j in jobs]
    mem = _PeakMemory(device)
    label = desc or f"fisher ({'+'.join(j.kind for j in jobs)})"
    try:
        counts, data_h_local = _run(model, batches, _Joint(plans), c.fisher, c.samples, c.seed, device,
                                    accepts_pos, progress, label)
        for plan in plans:
            plan.flush_dense()
    except BaseException:
        dist.raise_if_any_failed(True, device, "Fisher estimation")
        raise
    dist.raise_if_any_failed(False, device, "Fisher estimation")

    accs = [t for plan in plans for t in plan.acc.values()]
    dist.all_reduce_sum_(accs)
    n_samples, n_tokens, n_real = dist.sum_ints(counts, device)
    if n_samples == 0:
        raise InputError("no data: the batches yielded no samples")
    if n_tokens == 0:
        raise InputError("no counted tokens: every label is -100 (or padding); nothing to estimate")
    if c.reduction == "mean":
        for t in accs:
            t.div_(n_samples)
    cfg = getattr(model, "config", None)
    results = []
    for job, plan in zip(jobs, plans):
        plan.finish_pools()
        tensors = {k: v.detach().to("cpu", torch.float32) for k, v in plan.acc.items()}
        tensors.update({k: v.clone() for k, v in plan.extra.items()})
        out_meta = {
            "model": str(getattr(cfg, "_name_or_path", "") or type(model).__name__),
            **described,
            "data_hash": dist.combine_hashes(data_h_local),
            "options": json.dumps(job.options, sort_keys=True),
            "n_samples": str(n_samples),
            "n_tokens": str(n_tokens),
            "n_real_tokens": str(n_real),
            "world_size": str(dist.world_size()),
            "backend": resolved,
            "peak_memory_bytes": str(mem.peak()),
            "peak_memory_source": mem.source,
            "layers": json.dumps([L.name for L in job.layers]),
            "torch_version": torch.__version__,
        }
        if job.kind == "diag":
            out_meta["params"] = json.dumps({s.param_name: s.layer for s in plan.sites})
            if plan.pools:
                out_meta["pool"] = json.dumps({k: list(v) for k, v in plan.pools.items()})
        out_meta.update(dict(job.meta or {}))
        results.append(FisherResult(job.kind, tensors, out_meta))
    return results


def _subspace_hash(subs) -> str:
    h = hashlib.sha256()
    for name, (q_in, q_out) in subs.items():
        h.update(name.encode())
        h.update(tensor_bytes(q_in))
        h.update(tensor_bytes(q_out))
    return h.hexdigest()


def _run(model, batches, plan: "_Plan | _Joint", fisher, samples, seed, device, accepts_pos, progress, desc):
    """The batch loop; returns ([n_samples, n_tokens, n_real_tokens], local data hash)."""
    from tqdm.auto import tqdm

    n_samples = n_tokens = n_real = 0
    h = hashlib.sha256()
    gen = None
    if fisher == "true":
        gen = torch.Generator(device=device).manual_seed(seed + 1_000_003 * dist.rank())
    draws = samples if fisher == "true" else 1
    n_vocab = model.get_input_embeddings().num_embeddings
    keep = _accepts(model, "logits_to_keep")
    flags = {m: m.training for m in model.modules()}
    total = len(batches) if hasattr(batches, "__len__") else None
    bar = tqdm(batches, total=total, disable=not progress or dist.rank() != 0,
               desc=desc, unit="batch")
    model.eval()
    try:
        with Capture(model, plan.sites) as cap, torch.enable_grad():
            for bi, batch in enumerate(bar):
                kw, am, labels = _prepare(batch, bi, device, accepts_pos)
                _batch_hash(h, kw, labels)
                ids = kw["input_ids"]
                if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= n_vocab):
                    raise InputError(f"batch {bi}: input_ids must be in [0, {n_vocab}) (the model's "
                                     f"vocabulary), got {int(ids.min())}..{int(ids.max())}")
                counted = labels[:, 1:] != IGNORE
                n_samples += labels.shape[0]
                n_tokens += int(counted.sum())
                n_real += int(am.sum())
                if not counted.any():
                    continue  # no loss, every gradient is zero
                cap.clear()
                logits = _counted_logits(model, kw, counted, keep)
                outs = cap.outputs()
                for i, calls in enumerate(cap.calls):
                    if not calls:
                        raise InputError(f"layer {plan.sites[i].layer} was not called in the forward "
                                         "pass (is its adapter disabled or merged?)")
                for k in range(draws):
                    if fisher == "true":
                        with torch.no_grad():
                            probs = torch.softmax(logits.float(), dim=-1)
                            y = torch.multinomial(probs, 1, generator=gen).squeeze(1)
                            del probs
                    else:
                        y = labels[:, 1:][counted]
                        if int(y.min()) < 0 or int(y.max()) >= logits.shape[-1]:
                            raise InputError(f"batch {bi}: labels must be -100 or token ids in "
                                             f"[0, {logits.shape[-1]}), got {int(y.min())}..{int(y.max())}")
                    loss = F.cross_entropy(logits.float(), y, reduction="sum")
                    grads = torch.autograd.grad(loss, outs, retain_graph=k < draws - 1,
                                                allow_unused=True)
                    _accumulate(plan, cap, grads, am, bi, 1.0 / draws)
                    del loss, grads
                del logits, outs
                cap.clear()
    finally:
        for m, t in flags.items():  # per module, not m.train(t): that recurses into the children
            if m.training != t:
                m.training = t
        bar.close()
    return [n_samples, n_tokens, n_real], h.hexdigest()


def _accumulate(plan: "_Plan | _Joint", cap: Capture, grads, am: Tensor, bi: int, w: float) -> None:
    B, T = am.shape
    work = []  # (site index, x, g, mask)
    j = 0
    for i, calls in enumerate(cap.calls):
        site = plan.sites[i]
        xs, gs = [], []
        for x, out in calls:
            g = grads[j]
            j += 1
            if x.dim() != 3 or tuple(x.shape[:2]) != (B, T):
                raise InputError(f"layer {site.layer} got an input of shape {tuple(x.shape)}; "
                                 f"expected [B, T, d] = [{B}, {T}, d]")
            if g is None:  # the output does not reach the loss: its gradient is zero
                g = torch.zeros(out.shape, dtype=x.dtype, device=x.device)
            xs.append(x)
            gs.append(g.to(x.dtype))
        mask = am if len(calls) == 1 else am.repeat(1, len(calls))
        mask = mask.to(xs[0].device)  # a split model's layer sits on its own device
        x = xs[0] if len(xs) == 1 else torch.cat(xs, dim=1)
        g = gs[0] if len(gs) == 1 else torch.cat(gs, dim=1)
        work.append((i, x, g, mask))
    _check_finite(plan, work, bi)
    for i, x, g, mask in work:
        plan.updates[i](x, g, mask, w)


def _check_finite(plan: "_Plan | _Joint", work, bi: int) -> None:
    """NaN/Inf anywhere in a captured gradient or input -> NonFiniteError naming the first layer.

    One fp32 sum per tensor and one host sync per batch: a sum is finite iff every term is (short
    of an fp32 overflow of the sum itself, which would make the Fisher overflow too)."""
    dev = work[0][1].device if work else None
    sums = torch.stack([t.sum(dtype=torch.float32).to(dev) for _, x, g, _ in work for t in (g, x)])
    if bool(torch.isfinite(sums).all()):
        return
    bad = (~torch.isfinite(sums)).nonzero()[0, 0].item()
    i = work[bad // 2][0]
    site = plan.sites[i]
    what = "gradient at the output" if bad % 2 == 0 else "input"
    where = f"layer {site.layer}" + (f" ({site.param_name})" if site.param_name else "")
    raise NonFiniteError(f"NaN/Inf in the {what} of {where} in batch {bi}; check the data, the "
                         "adapter weights, and the model dtype (bf16/fp16 overflow)")
