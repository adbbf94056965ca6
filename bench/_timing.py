"""The one timing helper of the op benchmarks: modes, machine description, ratio tables, JSON.

Every benchmark module times its candidates with pytest-benchmark (``benchmark.pedantic``), one test
per candidate, grouped per problem (``benchmark.group``); ``benchmark.extra_info`` carries the
candidate's role: ``"limit"`` marks the row every other row is divided by (the equal-flop GEMM, a
plain copy of w, or the torch reference when there is no better bound). At the end of the session
(bench/conftest.py) the table of time / limit ratios is printed and, in full mode, written to
``bench/results/<group>.json`` together with the machine, versions, dtype and shape of every row.

Ratios are given from medians and from minima: the machine may be shared, and the minimum of many
rounds is the better estimate of the unloaded time of both the candidate and the limit.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

RESULTS = Path(__file__).parent / "results"


@dataclass(frozen=True)
class Mode:
    name: str  # "quick" or "full"
    rounds: int
    warmup: int

    @property
    def full(self) -> bool:
        return self.name == "full"


QUICK = Mode("quick", rounds=3, warmup=1)
FULL = Mode("full", rounds=15, warmup=2)


def machine() -> dict:
    from sstmerge.io import cpu_model

    try:
        from sstmerge import _C

        isa = _C.isa()
    except ImportError:
        isa = None
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpp_isa": isa,
        "load_avg": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def run(benchmark, fn: Callable[[], object], mode: Mode, *, group: str, role: str = "peer",
        setup: Callable[[], object] | None = None, **info) -> None:
    """Time ``fn`` with pytest-benchmark in ``group``; ``role`` is "limit", "cpp", "reference" or
    "peer"; ``info`` (dtype, shape, ...) goes into the results row."""
    benchmark.group = group
    benchmark.extra_info.update(role=role, mode=mode.name, **{k: str(v) for k, v in info.items()})
    kwargs = {}
    if setup is not None:
        kwargs["setup"] = setup
    benchmark.pedantic(fn, rounds=mode.rounds, warmup_rounds=mode.warmup, iterations=1, **kwargs)


def ratio_tables(benchmarks) -> dict[str, list[dict]]:
    """Per group, rows sorted by time with ratios to the group's limit row."""
    groups: dict[str, list] = {}
    for b in benchmarks:
        if b.stats is None or not b.stats.data:
            continue
        groups.setdefault(b.group or "", []).append(b)
    tables = {}
    for group, bs in groups.items():
        limits = [b for b in bs if b.extra_info.get("role") == "limit"]
        lim = limits[0].stats if limits else None
        rows = []
        for b in sorted(bs, key=lambda b: b.stats.median):
            rows.append({
                "name": b.name.split("[", 1)[-1].rstrip("]"),
                "role": b.extra_info.get("role"),
                "median_ms": 1e3 * b.stats.median,
                "min_ms": 1e3 * b.stats.min,
                "iqr_ms": 1e3 * b.stats.iqr,
                "rounds": len(b.stats.data),
                "ratio_median": b.stats.median / lim.median if lim else None,
                "ratio_min": b.stats.min / lim.min if lim else None,
                **{k: v for k, v in b.extra_info.items() if k not in ("role",)},
            })
        tables[group] = rows
    return tables


def format_tables(tables: dict[str, list[dict]]) -> str:
    out = []
    for group, rows in tables.items():
        out.append(f"\n== {group} (ratio = time / limit) ==")
        out.append(f"{'candidate':34s} {'role':9s} {'median ms':>10s} {'min ms':>9s} "
                   f"{'x limit (med)':>13s} {'x limit (min)':>13s}")
        for r in rows:
            rm = f"{r['ratio_median']:.2f}" if r["ratio_median"] is not None else "-"
            rn = f"{r['ratio_min']:.2f}" if r["ratio_min"] is not None else "-"
            out.append(f"{r['name'][:34]:34s} {str(r['role']):9s} {r['median_ms']:10.2f} "
                       f"{r['min_ms']:9.2f} {rm:>13s} {rn:>13s}")
    return "\n".join(out)


def write_results(tables: dict[str, list[dict]]) -> list[Path]:
    """bench/results/<group>.json: {"machine": ..., "rows": [...]} (replaced on each full run)."""
    RESULTS.mkdir(exist_ok=True)
    paths = []
    m = machine()
    for group, rows in tables.items():
        p = RESULTS / f"{group.replace('/', '_').replace(' ', '_')}.json"
        tmp = p.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"group": group, "machine": m, "rows": rows}, indent=2))
        tmp.replace(p)
        paths.append(p)
    return paths


def interleaved(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    """Seconds per call of each candidate: one warm-up call each, then ``rounds`` rounds calling
    every candidate once in turn, so that a change of load hits all of them alike."""
    for f in fns.values():
        f()
    ts: dict[str, list[float]] = {n: [] for n in fns}
    for _ in range(rounds):
        for n, f in fns.items():
            t0 = time.perf_counter()
            f()
            ts[n].append(time.perf_counter() - t0)
    return ts


def check_target(mode: Mode, what: str, op: Callable[[], object], limit: Callable[[], object],
                 bound: float) -> None:
    """DESIGN.md section 8: ``op`` takes at most ``bound`` x the time of ``limit``, on the medians of
    interleaved rounds (minima printed too). Asserted in full mode only: quick-mode shapes are too
    small for the targets."""
    ts = interleaved({"op": op, "limit": limit}, max(5, mode.rounds))
    med = statistics.median(ts["op"]) / statistics.median(ts["limit"])
    mn = min(ts["op"]) / min(ts["limit"])
    print(f"\n{what}: {med:.2f}x the limit (median; min {mn:.2f}x), target <= {bound}x, "
          f"load {machine()['load_avg']}")
    if mode.full:
        assert med <= bound, f"{what}: {med:.2f}x the limit (median) > {bound}x"


def assert_agree(name: str, got: torch.Tensor, want: torch.Tensor, rtol: float = 1e-4) -> None:
    """A peer must compute the same thing before its time means anything."""
    got, want = got.detach().double(), want.detach().double()
    err = (got - want).abs().max().item() / max(want.abs().max().item(), 1e-30)
    assert err <= rtol, f"{name} disagrees with the reference: relative error {err:.3g}"
