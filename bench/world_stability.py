"""Is the tiny world independent of round-off? Build it under several CPU settings and seeds, and
tabulate the reference numbers with their spread.

    python bench/world_stability.py --seeds 0 1 2 --settings all --out bench/results/world_stability.json

Each (setting, seed) builds its own world from nothing in its own cache directory (a setting changes
no cache key, so a shared cache would hide it) and measures it with ``python -m sstmerge.worlds
reference tiny``. Settings imitate other x86-64 machines on this one: torch's kernel dispatch
(``ATEN_CPU_CAPABILITY``), MKL's instruction set (``MKL_ENABLE_INSTRUCTIONS``), sstmerge's C++ kernels
(``SSTMERGE_ISA``) and the thread count. The issue's bar: every number within ±5 points across all runs
(a spread of at most 10) and every calibration target met with 5 points to spare.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SETTINGS = {
    "default": {},
    "aten-avx2": {"ATEN_CPU_CAPABILITY": "avx2"},
    "aten-default": {"ATEN_CPU_CAPABILITY": "default"},
    "amd-like": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "SSTMERGE_ISA": "avx2",
                 "SSTMERGE_AMX": "0"},
    "isa-generic": {"SSTMERGE_ISA": "generic"},
    "2-threads": {"OMP_NUM_THREADS": "2"},
}
MODELS = ("base", "utility", "safety", "ta")
QUANTITIES = ("mmlu", "refusal", "over_refusal")


def run_one(setting: str, seed: int, split: str, cache_root: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **SETTINGS[setting],
           "SSTMERGE_CACHE": str(cache_root / f"{setting}-{seed}")}
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "sstmerge.worlds", "reference", "tiny", "--seeds", str(seed),
                            "--split", split, "--margin", "0.05", "--out", f.name],
                           env=env, capture_output=True, text=True)
        if r.returncode not in (0, 1):  # 1: a target missed (reported in the table), anything else: failure
            raise RuntimeError(f"{setting} seed {seed}: exit {r.returncode}: {r.stderr.strip().splitlines()[-1:]}")
        table = json.loads(Path(f.name).read_text())[f"seed {seed}"]
    table["wall_s"] = round(time.perf_counter() - t0, 1)
    return table


def cpu_model() -> str:
    """``lscpu``'s model name with its family and model numbers ("AMD EPYC" alone names no generation)."""
    info = dict(ln.split(":", 1) for ln in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
                if ":" in ln)
    info = {k.strip(): v.strip() for k, v in info.items()}
    return f"{info.get('Model name', '?')} (family {info.get('CPU family', '?')} model {info.get('Model', '?')})"


def markdown(runs: dict[str, dict]) -> str:
    labels = list(runs)
    lines = ["| model | quantity | " + " | ".join(labels) + " | min | max | spread |",
             "|---|---|" + "---|" * (len(labels) + 3)]
    for m in MODELS:
        for q in QUANTITIES:
            v = [100 * runs[k][m][q] for k in labels]
            lines.append(f"| {m} | {q} | " + " | ".join(f"{x:.1f}" for x in v)
                         + f" | {min(v):.1f} | {max(v):.1f} | **{max(v) - min(v):.1f}** |")
    missed = {k: [t for t, ok in runs[k]["targets"].items() if not ok] for k in labels}
    lines.append("")
    lines.append("Targets missed with a 5-point margin: " + (", ".join(f"{k}: {v}" for k, v in missed.items() if v)
                                                             or "none"))
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--settings", nargs="+", default=["all"], help=f"any of {', '.join(SETTINGS)}, or all")
    p.add_argument("--split", default="test", choices=("test", "dev"))
    p.add_argument("--jobs", type=int, default=2, help="builds in parallel (each runs one thread)")
    p.add_argument("--out", help="write every run's table (JSON) here")
    a = p.parse_args()
    settings = list(SETTINGS) if a.settings == ["all"] else a.settings
    bad = [s for s in settings if s not in SETTINGS]
    if bad:
        p.error(f"unknown settings {bad}; known: {', '.join(SETTINGS)}")
    from concurrent.futures import ThreadPoolExecutor

    cache_root = Path(tempfile.mkdtemp(prefix="world-stability-"))
    jobs = [(s, seed) for seed in a.seeds for s in settings]
    with ThreadPoolExecutor(a.jobs) as ex:
        tables = list(ex.map(lambda j: run_one(j[0], j[1], a.split, cache_root), jobs))
    runs = {f"{s} / {seed}": t for (s, seed), t in zip(jobs, tables)}
    model = cpu_model()
    print(f"CPU: {model}; split: {a.split}; runs: {len(runs)}\n")
    print(markdown(runs))
    if a.out:
        Path(a.out).write_text(json.dumps({"cpu": model, "split": a.split, "runs": runs}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
