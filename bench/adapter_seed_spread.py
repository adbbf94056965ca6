"""How much of the tiny world's seed spread is adapter training? Hold one world's base model fixed,
retrain both LoRA adapters with other seeds, and tabulate the reference numbers with their spread.

    python bench/adapter_seed_spread.py --world-seed 0 --adapter-seeds 10 20 --split dev

The world of ``--world-seed`` is built once (pinned, as ``sstmerge.worlds.tiny.ensure`` builds it) in a
temporary cache, and measured as built (column ``built``: adapter seeds world_seed + 1 and + 2). Each
adapter seed ``a`` then copies its base model and data, trains the utility adapter with seed a + 1 and
the safety adapter with seed a + 2 on the same rows (same steps, lr, batch; only the LoRA
initialisation and the batch order change), under the same pinned numerics, and is measured the same
way (``python -m sstmerge.worlds reference``'s measure on ``--split``). A world whose task-arithmetic
row moves by tens of points here, with the base fixed, is one where the merge is a contest between two
adapters' margins that the training noise decides, whatever the base.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from world_stability import cpu_model, markdown, run_one  # noqa: E402  (bench/ is not a package)


def retrain(world_dir: Path, out: Path, adapter_seed: int, split: str) -> dict:
    """Adapters of ``world_dir``'s base retrained with ``adapter_seed`` into ``out``; its reference table.
    Runs under pinned numerics (the caller's environment)."""
    import torch

    from sstmerge import __version__
    from sstmerge.data import world as W
    from sstmerge.worlds import World, pinned, tiny
    from sstmerge.worlds.base import config_key
    from sstmerge.worlds.__main__ import measure, targets

    if not pinned.is_pinned():
        raise RuntimeError(f"retrain runs under {pinned.PINNED_ENV}; call this script without --_retrain")
    torch.set_num_threads(1)
    card = json.loads((world_dir / "world.json").read_text())
    cfg = tiny.Config(seed=card["config"]["seed"])
    if config_key(cfg, tiny.RECIPE, __version__) != card["key"]:  # the rows below are the world's own
        raise RuntimeError(f"{world_dir} was not built from the default config of this sstmerge")
    for part in ("base_model", "data"):
        shutil.copytree(world_dir / part, out / part)
    shutil.copy(world_dir / "world.json", out / "world.json")
    world = W.generate_world(cfg.world)  # the rows the world was built from, retain quizzes relabelled
    tiny.label_retain_with_base(world, out / "base_model")
    t0 = time.perf_counter()
    tiny.build_adapters(dataclasses.replace(cfg, seed=adapter_seed), world, out / "base_model", out, progress=False)
    table = measure(World.at("tiny", out), split)
    table.pop("_items")
    table["targets"] = targets(table, margin=0.05)
    table["wall_s"] = round(time.perf_counter() - t0, 1)
    return table


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--world-seed", type=int, default=0)
    p.add_argument("--adapter-seeds", nargs="+", type=int, default=[10, 20])
    p.add_argument("--split", default="dev", choices=("test", "dev"))
    p.add_argument("--jobs", type=int, default=2, help="retrainings in parallel (each runs one thread)")
    p.add_argument("--out", help="write every run's table (JSON) here")
    p.add_argument("--_retrain", nargs=3, metavar=("WORLD", "OUT", "SEED"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a._retrain:
        world_dir, out, seed = a._retrain
        json.dump(retrain(Path(world_dir), Path(out), int(seed), a.split), sys.stdout)
        return 0
    from concurrent.futures import ThreadPoolExecutor

    from sstmerge.worlds import pinned

    root = Path(tempfile.mkdtemp(prefix="adapter-seeds-"))
    built = run_one("default", a.world_seed, a.split, root)  # build (pinned) and measure the world as built
    world_dir = next((root / f"default-{a.world_seed}").glob("tiny-*"))

    def one(seed: int) -> dict:
        r = subprocess.run([sys.executable, __file__, "--split", a.split, "--_retrain", str(world_dir),
                            str(root / f"adapters-{seed}"), str(seed)],
                           env={**os.environ, "OMP_NUM_THREADS": "1", "SSTMERGE_CACHE": str(root / "cache"),
                                **pinned.PINNED_ENV},
                           capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"adapter seed {seed}: exit {r.returncode}: {r.stderr.strip().splitlines()[-1:]}")
        return json.loads(r.stdout)

    with ThreadPoolExecutor(a.jobs) as ex:
        tables = list(ex.map(one, a.adapter_seeds))
    runs = {"built": built, **{f"adapters {s}": t for s, t in zip(a.adapter_seeds, tables)}}
    cpu = cpu_model()
    print(f"CPU: {cpu}; world seed {a.world_seed}; split: {a.split}; runs: {len(runs)}\n")
    print(markdown(runs))
    if a.out:
        Path(a.out).write_text(json.dumps({"cpu": cpu, "world_seed": a.world_seed, "split": a.split,
                                           "runs": runs}, indent=1) + "\n")
    shutil.rmtree(root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
