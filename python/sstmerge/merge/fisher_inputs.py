"""The Fisher statistics the merge methods need: computing them, loading them, and reading one
layer's block in the basis a method works in.

Roles: ``utility`` is taken on the utility data at base + utility adapter, ``safety`` on the safety
data at base + safety adapter (each adapter's own data and model, as in DESIGN.md §7). Data rows are
chat rows (``{"messages": [...]}``, assistant tokens labelled) or MMLU rows (the answer letter
labelled), or a mix of both (:func:`sstmerge.data.batches.training_batches`).

Kinds (see :mod:`sstmerge.fisher`):
  * ``diag``      diagonal Fisher of each target layer's base weight [O, I] (target="linear"):
                  the Fisher of the *effective* weight, because the gradient at the base Linear's
                  output equals the gradient at the module output. One fp32 [O, I] per layer:
                  ~53 GB per role for Qwen2.5-14B with all 7 projections, so only on request.
  * ``diag_sub``  the same diagonal Fisher restricted to the joint subspace,
                  ``K^T diag(vec F) K`` [n, n] (K = q_out ⊗ q_in), accumulated batch by batch
                  (:func:`sstmerge.fisher.restrict.restrict_diag`); what SST's default curvature
                  uses. A ``diag`` file serves too (restricted when read: the same numbers).
  * ``diag_pool`` the diagonal Fisher as tile means, at most POOL_MAX_ENTRIES entries per layer
                  (exact for smaller layers); what fisher_avg uses by default. A ``diag`` file
                  serves too (then at full resolution).
  * ``subspace``  exact Fisher of ``S = q_out^T W q_in`` (row-major vec) in the joint subspace.
  * ``kfac``      Kronecker factors ``A = sum x x^T`` and ``G = sum g g^T`` projected into the joint
                  subspace: ``A' = q_in^T A q_in``, ``G' = q_out^T G q_out``.

Where (the model point): by default each role is taken at its own adapter's model (``own``). A
diagonal kind can also be taken at the base model alone (``@base``: the adapter's LoRA scaling set to
0) or at base + utility + safety (``@merged``: the other adapter's update added to the base weights),
written ``diag_sub@base`` etc. (:func:`at_kind`). At the base, the Fisher of the safety data measures
which weights the base must move to refuse; at a trained adapter it is small where that adapter
already fits its data.

On disk (``--fisher DIR``) the statistics are ``DIR/{role}.{kind}.safetensors`` files written by
:meth:`sstmerge.fisher.FisherResult.save`. A Fisher computed for another model or other adapters is
detected by shape (diag) or by its stored subspace not spanning the adapters' joint subspace.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
from pathlib import Path
from typing import Iterable, Mapping

import torch
from torch import Tensor

from ..errors import InputError

ROLES = ("utility", "safety")
KINDS = ("diag", "diag_sub", "diag_pool", "subspace", "kfac")
#: Model points a Fisher can be taken at (module docstring); a bare kind name is at ``own``.
AT = ("own", "base", "merged")


def at_kind(kind: str, at: str) -> str:
    """The kind name of ``kind`` taken at model point ``at`` (``diag_sub`` / ``diag_sub@base``)."""
    if at not in AT:
        raise InputError(f"fisher_at must be one of {AT}, got {at!r}")
    return kind if at == "own" else f"{kind}@{at}"


def split_kind(name: str) -> tuple[str, str]:
    """(kind, at) of a kind name made by :func:`at_kind`."""
    kind, _, at = name.partition("@")
    return kind, at or "own"

#: the FisherResult kind each file kind holds
RESULT_KIND = {"diag": "diag", "diag_sub": "diag", "diag_pool": "diag", "subspace": "subspace", "kfac": "kfac"}
#: diag_pool: at most this many entries (4 MB fp32) per layer; smaller layers are exact.
POOL_MAX_ENTRIES = 1 << 20
_PEFT = "base_model.model."
#: A stored subspace basis Q_f matches ours (Q) when ||Q - Q_f Q_f^T Q||_max <= SPAN_TOL.
SPAN_TOL = 1e-3


@dataclasses.dataclass
class FisherInputs:
    """Fisher results keyed by (role, kind), with a key that identifies how they were made."""

    results: dict[tuple[str, str], object]
    key: str = ""

    def get(self, role: str, kind: str, method: str):
        fr = self.results.get((role, kind))
        if fr is None:
            have = ", ".join(f"{r}.{k}" for r, k in sorted(self.results)) or "none"
            raise InputError(f"{method} needs the {kind} Fisher of the {role} objective but the given Fisher holds {have}; "
                             f"compute it (--safety-data/--utility-data) or pass a --fisher DIR with {role}.{kind}.safetensors")
        return fr

    def first(self, role: str, kinds: tuple[str, ...], method: str) -> tuple[str, object]:
        """(kind, result) of the first of ``kinds`` present (forms of one statistic); else as :meth:`get`."""
        for k in kinds:
            if (role, k) in self.results:
                return k, self.results[(role, k)]
        return kinds[0], self.get(role, kinds[0], method)


def _kind_of(fr) -> str:
    kind = getattr(fr, "kind", None)
    if kind is None and isinstance(fr, Mapping):
        kind = fr.get("kind")
    if kind == "diag":  # which bounded form: by its layout
        meta = getattr(fr, "meta", None) or {}
        if "pool" in meta:
            return "diag_pool"
        if any(k.endswith(".fisher") for k in tensors_of(fr)):
            return "diag_sub"
    if kind not in KINDS:
        raise InputError(f"a Fisher result has unknown kind {kind!r}; expected one of {KINDS}")
    return kind


def tensors_of(fr) -> Mapping[str, Tensor]:
    t = getattr(fr, "tensors", None)
    if t is None and isinstance(fr, Mapping):
        t = fr.get("tensors")
    if not isinstance(t, Mapping):
        raise InputError("a Fisher result has no tensors")
    return t


def as_inputs(fisher) -> FisherInputs | None:
    """Accept FisherInputs, a directory, or ``{role: result}`` / ``{(role, kind): result}``. The form
    (diag / diag_sub / diag_pool ...) is read from each result; the model point from the key's kind
    name (``diag@base``: :func:`at_kind`; a bare kind or ``{role: result}`` is at the adapters' own
    models)."""
    if fisher is None or isinstance(fisher, FisherInputs):
        return fisher
    if isinstance(fisher, (str, Path)):
        return load_dir(fisher)
    if isinstance(fisher, Mapping):
        out = {}
        for k, fr in fisher.items():
            role, name = k if isinstance(k, tuple) else (k, None)
            if role not in ROLES:
                raise InputError(f"Fisher role must be one of {ROLES}, got {role!r}")
            at = split_kind(name)[1] if name else "own"
            if at not in AT:
                raise InputError(f"Fisher {role}.{name}: the model point must be one of {AT}, got {at!r}")
            out[(role, at_kind(_kind_of(fr), at))] = fr
        return FisherInputs(out, key=_results_key(out))
    raise InputError(f"fisher must be a directory, a FisherInputs or a dict of Fisher results, got {type(fisher).__name__}")


def _results_key(results: Mapping) -> str:
    """A digest of every result's role, kind, compute key and tensor bytes (names, dtypes, shapes, data).

    The bytes, not a sum: a float64 sum of a large tensor differs in its last bits between thread counts
    (a parallel reduction's order), which made a cached merge look stale when a run changed its threads."""
    h = hashlib.blake2b(digest_size=16)
    for (role, kind) in sorted(results):
        h.update(f"{role}.{kind}".encode())
        meta = getattr(results[(role, kind)], "meta", None) or {}
        h.update(meta.get("sstmerge.merge.key", "").encode())
        for name, t in sorted(tensors_of(results[(role, kind)]).items()):
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()[:16]


def load_dir(path: str | Path) -> FisherInputs:
    from ..fisher.result import FisherResult

    path = Path(path)
    if not path.is_dir():
        raise InputError(f"--fisher {path} is not a directory; it must hold {{utility,safety}}.{{{','.join(KINDS)}}}.safetensors")
    results = {}
    for role in ROLES:
        for kind in (at_kind(k, at) for k in KINDS for at in AT):
            f = path / f"{role}.{kind}.safetensors"
            if f.exists():
                fr = FisherResult.load(f)
                if fr.kind != RESULT_KIND[split_kind(kind)[0]]:
                    raise InputError(f"{f} holds a {fr.kind} Fisher, not {kind}; rename or recompute it")
                results[(role, kind)] = fr
    if not results:
        raise InputError(f"--fisher {path} holds no {{utility,safety}}.{{{','.join(KINDS)}}}.safetensors file")
    return FisherInputs(results, key=_results_key(results))


# ------------------------------------------------------------------------- one layer's block

def _finite(t: Tensor, what: str) -> Tensor:
    if not torch.isfinite(t).all():
        raise InputError(f"{what} holds NaN or Inf values; recompute the Fisher (check the data and the model)")
    return t


def _lookup(tensors: Mapping[str, Tensor], candidates: Iterable[str], what: str, hint: str) -> Tensor:
    for c in candidates:
        if c in tensors:
            return tensors[c]
    raise InputError(f"the {what} has no entry for {hint}; it was computed for another model or other target modules")


class DiagLayer:
    """One layer's diagonal Fisher [O, I] from a ``diag`` (exact) or ``diag_pool`` (tile means)
    result, handed out in fp32 row blocks so no [O, I] fp64 copy is ever made."""

    def __init__(self, fr, layer: str, shape: tuple[int, int], what: str):
        t = tensors_of(fr)
        names = [f"{layer}.weight", f"{layer}.base_layer.weight", f"{_PEFT}{layer}.base_layer.weight", f"{_PEFT}{layer}.weight"]
        key = next((c for c in names if c in t), None)
        if key is None:
            _lookup(t, names, what, f"layer {layer} (a diag Fisher with target='linear' is needed)")
        pools = json.loads((getattr(fr, "meta", None) or {}).get("pool", "{}"))
        self.po, self.pi = pools.get(key, (1, 1))
        self.shape, self.layer, self.what = tuple(shape), layer, what
        P = t[key].float()
        want = (-(-shape[0] // self.po), -(-shape[1] // self.pi))
        if tuple(P.shape) != want:
            raise InputError(f"the {what} of layer {layer} has shape {tuple(P.shape)}, the layer is {tuple(shape)}"
                             + (f" (pooled {self.po}x{self.pi}: {want})" if (self.po, self.pi) != (1, 1) else "")
                             + "; it was computed for another model")
        _finite(P, f"the {what} of layer {layer}")
        if (P < 0).any():
            raise InputError(f"the {what} of layer {layer} has negative entries; a diagonal Fisher is a sum of squares")
        self.P = P

    @property
    def pooled(self) -> bool:
        return (self.po, self.pi) != (1, 1)

    def rows(self, r0: int, r1: int) -> Tensor:
        from ..fisher.restrict import unpool_rows

        return unpool_rows(self.P, self.po, self.pi, self.shape[1], r0, r1)

    def full(self) -> Tensor:
        return self.rows(0, self.shape[0])


def diag_linear(fr, layer: str, shape: tuple[int, int], what: str) -> Tensor:
    """Diagonal Fisher [O, I] (fp64) of the layer's base weight (small layers / tests only)."""
    return DiagLayer(fr, layer, shape, what).full().double()


def diag_restricted(fisher: "FisherInputs", role: str, layer: str, q_in: Tensor, q_out: Tensor, method: str,
                    at: str = "own") -> Tensor:
    """The diagonal Fisher restricted to the joint subspace, ``K^T diag(vec F) K`` [n, n] fp64, from a
    ``diag_sub`` result (rotated into our basis) or an exact ``diag`` one (restricted here), taken at ``at``."""
    from ..fisher.restrict import restrict_diag

    kind, fr = fisher.first(role, (at_kind("diag_sub", at), at_kind("diag", at)), method)
    what = f"{role} Fisher"
    if split_kind(kind)[0] == "diag_sub":
        return subspace_block(fr, layer, q_in, q_out, what)
    D = DiagLayer(fr, layer, (q_out.shape[0], q_in.shape[0]), what)
    if D.pooled:
        raise InputError(f"{method}: the {what} of layer {layer} is pooled; the subspace restriction needs the exact diag or diag_sub")
    return restrict_diag(D.P, q_in, q_out)


def _rotation(Q: Tensor, Qf: Tensor | None, layer: str, side: str, what: str) -> Tensor | None:
    """R = Qf^T Q when span(Qf) == span(Q) (so Q = Qf R); None when Qf is absent."""
    if Qf is None:
        return None
    Q, Qf = Q.double(), Qf.double()
    if Qf.shape != Q.shape:
        raise InputError(f"the {what} of layer {layer} was computed in a {side} subspace of shape {tuple(Qf.shape)}, "
                         f"but the adapters' joint subspace is {tuple(Q.shape)}; it belongs to other adapters or another model")
    R = Qf.T @ Q
    err = float((Q - Qf @ R).abs().max()) if Q.numel() else 0.0
    if err > SPAN_TOL:
        raise InputError(f"the {what} of layer {layer} was computed in another {side} subspace (mismatch {err:.2g}); "
                         "it belongs to other adapters or another model: recompute it")
    return R


def subspace_block(fr, layer: str, q_in: Tensor, q_out: Tensor, what: str) -> Tensor:
    """Exact Fisher [n, n] (n = m_o m_i, row-major vec of S = q_out^T W q_in) in *our* basis.

    If the file's basis differs by rotations R_in, R_out (same spans), then
    ``S_ours = R_out^T S_f R_in`` and ``F_ours = K F_f K^T`` with ``K = kron(R_out^T, R_in^T)``."""
    t = tensors_of(fr)
    F = _lookup(t, [f"{layer}.fisher"], what, f"layer {layer} (a subspace Fisher is needed)")
    qi = t.get(f"{layer}.q_in")
    qo = t.get(f"{layer}.q_out")
    if qi is None or qo is None:
        raise InputError(f"the {what} of layer {layer} lacks its q_in/q_out bases; recompute it with sstmerge.fisher")
    R_in = _rotation(q_in, qi, layer, "input", what)
    R_out = _rotation(q_out, qo, layer, "output", what)
    n = q_in.shape[1] * q_out.shape[1]
    if tuple(F.shape) != (n, n):
        raise InputError(f"the {what} of layer {layer} is {tuple(F.shape)}, expected {(n, n)}")
    F = _finite(F.double(), f"the {what} of layer {layer}")
    K = torch.kron(R_out.T, R_in.T)
    F = K @ F @ K.T
    return 0.5 * (F + F.T)


def kfac_block(fr, layer: str, q_in: Tensor, q_out: Tensor, what: str) -> tuple[Tensor, Tensor]:
    """Kronecker factors (A [m_i, m_i], G [m_o, m_o]) in our basis (projected if stored full)."""
    t = tensors_of(fr)
    A = _finite(_lookup(t, [f"{layer}.A"], what, f"layer {layer} (a kfac Fisher is needed)").double(), f"the {what} of layer {layer}")
    G = _finite(_lookup(t, [f"{layer}.G"], what, f"layer {layer} (a kfac Fisher is needed)").double(), f"the {what} of layer {layer}")
    out = []
    for F, Q, key, side in ((A, q_in, "q_in", "input"), (G, q_out, "q_out", "output")):
        Qf = t.get(f"{layer}.{key}")
        if Qf is None:
            if tuple(F.shape) != (Q.shape[0], Q.shape[0]):
                raise InputError(f"the {what} of layer {layer} has a {side} factor {tuple(F.shape)}, but the layer's {side} "
                                 f"dimension is {Q.shape[0]}; it was computed for another model")
            Qd = Q.double()
            F = Qd.T @ F @ Qd
        else:
            R = _rotation(Q, Qf, layer, side, what)
            if tuple(F.shape) != (Q.shape[1], Q.shape[1]):
                raise InputError(f"the {what} of layer {layer} has a {side} factor {tuple(F.shape)}, expected {(Q.shape[1],) * 2}")
            F = R.T @ F @ R
        out.append(0.5 * (F + F.T))
    return out[0], out[1]


# ------------------------------------------------------------------------------- computing

def needs(methods: Iterable[str], options: Mapping[str, Mapping] | None = None) -> list[tuple[str, str]]:
    """The (role, kind) pairs that the given methods need with their (default or given) options."""
    from . import METHODS

    out: set[tuple[str, str]] = set()
    for m in methods:
        if m not in METHODS:
            raise InputError(f"unknown merge method {m!r}; choose from {', '.join(METHODS)}")
        spec = METHODS[m]
        opts = {**spec.defaults, **((options or {}).get(m) or {})}
        out.update(spec.fisher(opts))
    return sorted(out)


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(Path(path).iterdir()) if Path(path).is_dir() else [Path(path)]:
        if f.is_file() and f.suffix in (".json", ".safetensors"):
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _rows_hash(rows) -> str:
    return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()[:16]


def compute(base: str, utility, safety, pairs: list[tuple[str, str]], *, safety_rows, utility_rows,
            cache_dir: str | Path | None = None, backend: str = "auto", seed: int = 0, progress: bool = False,
            batch_size: int = 4, fisher: str = "empirical", samples: int = 1) -> FisherInputs:
    """Estimate the Fisher results ``pairs`` with :func:`sstmerge.fisher.estimate_many`: the kinds of
    one role at one model point share one forward/backward per batch.

    ``utility``/``safety`` are adapter directories. ``subspace``/``kfac`` are taken in the joint
    subspace of the two adapters (:func:`sstmerge.adapters.joint_subspace`). Results are cached in
    ``cache_dir`` as ``{role}.{kind}.safetensors`` with a key over base, adapters, rows and options.
    ``fisher``: "empirical" (labels from the data) or "true" (``samples`` label draws from the model
    per position, seeded), as :func:`sstmerge.fisher.estimate`. ``batch_size`` 4: at 512 tokens a
    Qwen2.5-14B pass then fits one 80 GB GPU (docs/models.md, "Planning a run"); the sums do not
    depend on it."""
    from .. import adapters as ad
    from ..fisher.result import FisherResult

    U = ad.load_adapter(utility, what="utility adapter")
    S = ad.load_adapter(safety, what="safety adapter")
    ad.check_pair(U, S)
    if not safety_rows or not utility_rows:
        raise InputError("Fisher estimation needs safety and utility data rows (--safety-data / --utility-data)")
    subspaces = None
    adapters = {"utility": utility, "safety": safety}
    rows = {"utility": utility_rows, "safety": safety_rows}
    results = {}
    todo: dict[tuple[str, str], list] = {}  # (role, model point) -> [(name, kind, key, path)] to estimate
    base_key = _file_hash(Path(base)) if Path(base).is_dir() else str(base)
    for role, name in pairs:
        kind, at = split_kind(name)
        key = hashlib.sha256(json.dumps({
            "base": base_key, "utility": _file_hash(Path(utility)), "safety": _file_hash(Path(safety)),
            "role": role, "kind": kind, "rows": _rows_hash(rows[role]), "fisher": fisher, "batch_size": batch_size,
            "seed": seed, **({"samples": samples} if fisher == "true" else {}),
            **({"pool_max": POOL_MAX_ENTRIES} if kind == "diag_pool" else {}), **({"at": at} if at != "own" else {})},
            sort_keys=True).encode()).hexdigest()[:24]
        path = Path(cache_dir) / f"{role}.{name}.safetensors" if cache_dir is not None else None
        if path is not None and path.exists():
            try:
                fr = FisherResult.load(path)
                if fr.meta.get("sstmerge.merge.key") == key:
                    results[(role, name)] = fr
                    continue
            except InputError:
                pass  # a corrupt or stale cache entry is recomputed
        todo.setdefault((role, at), []).append((name, kind, key, path))
    for (role, at), items in todo.items():
        kinds = [kind for _, kind, _, _ in items]
        if subspaces is None and any(k in ("subspace", "kfac", "diag_sub") for k in kinds):
            subspaces = ad.joint_subspace(U, S)
        other = adapters["safety" if role == "utility" else "utility"]
        frs = _estimate(base, adapters[role], rows[role], kinds, subspaces, backend=backend, seed=seed,
                        progress=progress, batch_size=batch_size, fisher=fisher, samples=samples,
                        desc=f"fisher {role}.{'+'.join(name for name, *_ in items)}", at=at, other=other)
        for (name, _, key, path), fr in zip(items, frs):
            fr.meta = {**dict(fr.meta), "sstmerge.merge.key": key, "sstmerge.merge.at": at}
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                fr.save(path)
            results[(role, name)] = fr
    return FisherInputs(results, key=_results_key(results))


def _estimate(base, adapter_dir, rows, kinds, subspaces, *, backend, seed, progress, batch_size, fisher, samples,
              desc, at="own", other=None) -> list:
    """The Fisher results of ``kinds`` for one role at one model point, from one forward/backward per
    batch (:func:`sstmerge.fisher.estimate_many`)."""
    from peft import PeftModel

    from ..data.batches import training_batches
    from ..fisher import estimate_many
    from ..models import load_model

    model, tok = load_model(base)
    model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.eval()
    if at != "own":
        for kind in kinds:
            _check_at(kind, at)
        _move_to(model, at, other)
    batches = list(training_batches(tok, rows, batch_size))  # chat rows or MMLU rows (answer letter labelled)
    specs = []
    for kind in kinds:
        est_kind = RESULT_KIND[kind]
        spec = dict(kind=est_kind, target="linear" if est_kind == "diag" else "lora")
        if kind in ("subspace", "kfac", "diag_sub"):
            spec["subspaces"] = subspaces
        if kind == "diag_pool":
            spec["pool_max"] = POOL_MAX_ENTRIES
        specs.append(spec)
    return estimate_many(model, batches, specs, fisher=fisher, samples=samples, backend=backend, seed=seed,
                         progress=progress, desc=desc)


def _check_at(kind: str, at: str) -> None:
    if RESULT_KIND[kind] != "diag":
        raise InputError(f"a {kind} Fisher is taken in the adapters' LoRA parameters, at their own model; "
                         f"fisher_at={at!r} needs a diagonal kind (SST: curvature='diag')")


def _move_to(model, at: str, other) -> None:
    """Put the peft model (its own adapter loaded) at model point ``at``: ``base`` sets the LoRA
    scaling of every wrapped layer to 0; ``merged`` adds the ``other`` adapter's update to the base
    weights. Only the diagonal kinds (gradients of the base weights) are defined there (:func:`_check_at`)."""
    from .. import adapters as ad
    from ..fisher.hooks import find_layers

    layers = find_layers(model, "linear", None)
    if at == "base":
        for layer in layers:
            layer.module.scaling = {k: 0.0 for k in layer.module.scaling}
        return
    O = ad.load_adapter(other, what="adapter")
    missing = [layer.name for layer in layers if layer.name not in O.layers]
    if missing:
        raise InputError(f"fisher_at='merged': the other adapter has no update for {missing[0]}; the two adapters "
                         "must target the same layers")
    with torch.no_grad():
        for layer in layers:
            w = layer.base.weight
            w.add_(O.layers[layer.name].delta().to(w.dtype))


def fisher_inputs(methods: Iterable[str], base: str, utility, safety, *, safety_rows, utility_rows,
                  cache_dir=None, backend: str = "auto", seed: int = 0, progress: bool = False,
                  options: Mapping[str, Mapping] | None = None, **kw) -> FisherInputs | None:
    """Compute (or load from ``cache_dir``) every Fisher result that ``methods`` need; None if none do."""
    pairs = needs(methods, options)
    if not pairs:
        return None
    return compute(base, utility, safety, pairs, safety_rows=safety_rows, utility_rows=utility_rows,
                   cache_dir=cache_dir, backend=backend, seed=seed, progress=progress, **kw)
