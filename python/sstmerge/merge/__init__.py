"""sstmerge.merge: SST-Merge and the baselines, LoRA-native and fused.

    merge(method, base, utility, safety, *, alpha, fisher=None, out=None, dense=False, **options)
        -> MergeResult

Every method yields per-layer merged factors ``dM = scale * B @ A``; both outputs come from them:
``out/`` is a peft LoRA adapter (``PeftModel.from_pretrained(base_model, out)`` loads it; ranks may
differ per layer) plus ``diagnostics.json`` and ``merge.json``; with ``dense=True`` also
``out/fused/``, the base model with the merged update fused into its weights by ``lora_merge_``.
The output directory is written atomically: a failing run leaves none behind. See docs/merge.md
for each method's math and the meaning of alpha.
"""

from __future__ import annotations

import dataclasses
import platform
import time
from pathlib import Path
from typing import Mapping

from .. import adapters as ad
from ..errors import InputError
from . import (dare, fisher_avg, regmean, safe_lora, safe_lora_adapter, safemerge, safemerge_adapter, sst,
               task_arithmetic, ties)
from .core import Context, LayerFactors, Method, check_finite
from .fisher_inputs import FisherInputs, as_inputs, fisher_inputs, needs

METHODS: dict[str, Method] = {m.METHOD.name: m.METHOD for m in (
    sst, task_arithmetic, ties, dare, safe_lora, safemerge, safe_lora_adapter, safemerge_adapter, fisher_avg, regmean)}

#: The methods exp1 and tune run by default: SST and the published baselines. The two variants that take
#: the alignment direction from the safety adapter (``safe_lora_adapter``, ``safemerge_adapter``) run when named.
DEFAULT_METHODS = ("sst", "task_arithmetic", "ties", "dare", "safe_lora", "safemerge", "fisher_avg", "regmean")

#: α sweeps used by exp1 (α = 0 is the utility model itself for every method).
DEFAULT_ALPHAS = (0.25, 0.5, 1.0, 2.0, 4.0)
QUICK_ALPHAS = (0.5, 1.0, 2.0)

__all__ = ["METHODS", "DEFAULT_METHODS", "DEFAULT_ALPHAS", "QUICK_ALPHAS", "MergeResult", "LayerFactors", "FisherInputs", "merge", "merge_sweep",
           "default_options", "fisher_inputs", "needs"]


def default_options(method: str) -> dict:
    if method not in METHODS:
        raise InputError(f"unknown merge method {method!r}; choose from {', '.join(METHODS)}")
    return dict(METHODS[method].defaults)


@dataclasses.dataclass
class MergeResult:
    method: str
    alpha: float
    options: dict
    base: str
    layers: dict[str, LayerFactors]
    diagnostics: dict
    out: Path | None = None
    info: dict = dataclasses.field(default_factory=dict)  # merge.json: provenance of the merge

    def delta(self, layer: str):
        return self.layers[layer].delta()

    def save_adapter(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        ad.save_adapter(path, {n: (f.B, f.A, f.scale) for n, f in self.layers.items()}, base_model=self.base)

    def write(self, out: str | Path, *, files=None, backend: str = "auto", progress: bool = False) -> None:
        """``out/``, atomically (a failure leaves nothing): see :meth:`write_into`."""
        from ..io import atomic_dir

        with atomic_dir(out) as tmp:
            self.write_into(tmp, files=files, backend=backend, progress=progress)
        self.out = Path(out)

    def write_into(self, path: Path, *, files=None, backend: str = "auto", progress: bool = False) -> None:
        """The peft adapter, diagnostics.json and merge.json into the existing directory ``path``;
        with ``files`` (the base's :class:`ModelFiles`) also ``path/fused/``."""
        from .writers import write_fused, write_json

        t0 = time.perf_counter()
        self.save_adapter(path)
        write_json(path / "diagnostics.json", _jsonable({"method": self.method, "alpha": self.alpha, **self.diagnostics}))
        info = dict(self.info)
        if files is not None:
            info["fused"] = write_fused(files, path / "fused", self.layers, backend=backend, progress=progress)
        info["write_seconds"] = round(time.perf_counter() - t0, 3)
        write_json(path / "merge.json", info)


def _as_adapter(x, what: str) -> ad.LoraAdapter:
    if isinstance(x, ad.LoraAdapter):
        return x
    return ad.load_adapter(x, what=what)


def _jsonable(v):
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, Mapping):
        return {str(k): _jsonable(x) for k, x in v.items()}
    return repr(v)


def merge(method: str, base, utility, safety, *, alpha: float, fisher=None, out=None, dense: bool = False,
          seed: int = 0, backend: str = "auto", progress: bool = False, safety_rows=None, utility_rows=None,
          **options) -> MergeResult:
    """Merge the safety adapter into the utility adapter with ``method`` at strength ``alpha``.

    base: the base model (a directory, or a name in the local HF cache). utility / safety: adapter
    directories (or loaded :class:`sstmerge.adapters.LoraAdapter`). fisher: a
    :class:`FisherInputs`, a ``--fisher`` directory, or ``{role: FisherResult}``; when the method
    needs Fisher statistics and none are given, ``safety_rows``/``utility_rows`` (chat rows) are used
    to estimate them. options: the method's options (see ``default_options(method)``).
    """
    return merge_sweep(method, base, utility, safety, alphas=[alpha], fisher=fisher,
                       outs=None if out is None else [out], dense=dense, seed=seed, backend=backend,
                       progress=progress, safety_rows=safety_rows, utility_rows=utility_rows, **options)[0]


def _alpha(alpha) -> float:
    try:
        alpha = float(alpha)
    except (TypeError, ValueError):
        raise InputError(f"alpha must be a number, got {alpha!r}") from None
    if not (alpha >= 0 and alpha < float("inf")):
        raise InputError(f"alpha must be a finite number >= 0, got {alpha}")
    return alpha


def merge_sweep(method: str, base, utility, safety, *, alphas, fisher=None, outs=None, dense: bool = False,
                seed: int = 0, backend: str = "auto", progress: bool = False, safety_rows=None,
                utility_rows=None, **options) -> list[MergeResult]:
    """:func:`merge` at every alpha of ``alphas``, with the alpha-independent work of each layer
    (SST's pencil, a dense method's target and range) done once: the results equal separate
    :func:`merge` calls. ``outs``: one output directory per alpha (or None: nothing written); each
    result is also written later by ``result.write(path)``."""
    t0 = time.perf_counter()
    if method not in METHODS:
        raise InputError(f"unknown merge method {method!r}; choose from {', '.join(METHODS)}")
    spec = METHODS[method]
    unknown = sorted(set(options) - set(spec.defaults))
    if unknown:
        raise InputError(f"{method}: unknown option(s) {', '.join(unknown)}; it takes {', '.join(spec.defaults) or 'none'}")
    alphas = [_alpha(a) for a in alphas]
    if not alphas:
        raise InputError("merge_sweep: no alpha given")
    if outs is not None and len(outs) != len(alphas):
        raise InputError(f"merge_sweep: {len(outs)} output directories for {len(alphas)} alphas")
    opts = {**spec.defaults, **options}

    from .writers import ModelFiles, resolve_model_dir

    U = _as_adapter(utility, "utility adapter")
    S = _as_adapter(safety, "safety adapter")
    ad.check_pair(U, S, equal_ranks=spec.equal_ranks)
    base_dir = resolve_model_dir(str(base))
    files = ModelFiles(base_dir)
    shapes = files.linear_shapes()
    ad.check_against_base(U, shapes, str(base), "utility adapter")
    ad.check_against_base(S, shapes, str(base), "safety adapter")
    for a, what in ((U, "utility"), (S, "safety")):
        if a.base_model and Path(a.base_model).is_dir() and Path(a.base_model).resolve() != base_dir.resolve() \
                and Path(a.base_model).name != base_dir.name:
            raise InputError(f"the {what} adapter was trained on {a.base_model}, not on {base_dir}; merge onto its own base model")

    fi = as_inputs(fisher)
    required = spec.fisher(opts)
    if required and fi is None:
        if safety_rows is None or utility_rows is None:
            raise InputError(f"{method} needs Fisher statistics ({', '.join(f'{r}.{k}' for r, k in required)}): "
                             "pass --fisher DIR or --safety-data and --utility-data")
        if not (isinstance(utility, (str, Path)) and isinstance(safety, (str, Path))):
            raise InputError("estimating the Fisher needs the adapters as directories")
        fi = fisher_inputs([method], str(base_dir), utility, safety, safety_rows=safety_rows, utility_rows=utility_rows,
                           backend=backend, seed=seed, progress=progress, options={method: opts})

    ctx = Context(base=str(base_dir), utility=U, safety=S, fisher=fi, seed=seed, progress=progress)
    swept = spec.run_sweep(ctx, alphas, **opts)
    seconds = time.perf_counter() - t0
    results = []
    for alpha, (layers, diagnostics) in zip(alphas, swept):
        if set(layers) != set(U.layers):
            raise RuntimeError(f"{method} returned {len(layers)} layers for {len(U.layers)} adapter layers")
        for name, f in layers.items():
            check_finite(name, f, method)
        info = {"method": method, "alpha": alpha, "options": _jsonable(opts), "seed": seed,
                "base": str(base_dir), "utility": U.describe(), "safety": S.describe(),
                "fisher_key": getattr(fi, "key", None), "ranks": {n: f.rank for n, f in layers.items()},
                "python": platform.python_version(),
                "sweep": {"alphas": alphas, "seconds": round(seconds, 3)}}  # computed together
        results.append(MergeResult(method, alpha, opts, str(base_dir), layers, diagnostics, info=info))
    if outs is not None:
        for r, out in zip(results, outs):
            r.write(out, files=files if dense else None, backend=backend, progress=progress)
    return results
