"""Build a world under pinned numerics, so every x86-64 CPU builds the same bits.

Training is chaotic: a round-off difference of one ulp in one step grows into a different model. With
the default dispatch, torch and MKL pick kernels by CPU (AVX-512 on Zen 4 and most Intel parts, AVX2 on
Zen 3), whose summation orders differ, so the same seed built worlds whose task-arithmetic refusal
rate differed by 40 points on two machines (even in fp64). A world is therefore built in a child
process whose numerics are pinned before torch is imported:

* ``ATEN_CPU_CAPABILITY=avx2``: torch's own vectorised kernels use the AVX2 variants;
* ``MKL_CBWR=AVX2``: MKL's conditional numerical reproducibility mode, the AVX2 code path with
  run-to-run and processor-to-processor identical results (matrix products go through MKL);
* ``ONEDNN_MAX_CPU_ISA=AVX2``: oneDNN kernels no wider than AVX2;
* one thread (``OMP_NUM_THREADS=MKL_NUM_THREADS=1``): reductions split the same way everywhere.

Every x86-64 CPU torch supports with AVX2 (Intel since Haswell, AMD since Zen 1) takes the same path.
Measured on an AMD EPYC Zen 4 (AVX-512): built pinned with or without ``MKL_ENABLE_INSTRUCTIONS=AVX2``
and ``SSTMERGE_ISA=avx2``, the adapters' safetensors are bitwise equal, and the reference table equals
the one a Zen 3 (AVX2-only) EPYC gave. Only the build is pinned; evaluation runs at full speed (an
argmax is not chaotic: the same table came out unpinned).
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import tempfile
from pathlib import Path

#: The environment of a pinned build (module docstring).
PINNED_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2",
              "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def is_pinned() -> bool:
    """True when this process runs under :data:`PINNED_ENV`."""
    return all(os.environ.get(k) == v for k, v in PINNED_ENV.items())


def numerics() -> dict:
    """What a world card records about the numerics it was built under."""
    import torch

    return {"pinned": is_pinned(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(), **{k: os.environ.get(k) for k in PINNED_ENV}}


def build(world: str, cache_dir: str | os.PathLike, config, *, progress: bool = True, entry: str = "ensure") -> None:
    """Run ``sstmerge.worlds.<world>.<entry>(cache_dir, config=config)`` in a pinned child process
    (``entry``: ``ensure``, the world; ``aligned_pair``, its aligned twin).

    Its progress goes to this process's stderr; a failed build raises ``RuntimeError`` naming the
    exit status (the child's traceback is printed above it).
    """
    with tempfile.TemporaryDirectory(prefix="sstmerge-pinned-") as tmp:
        spec = Path(tmp) / "config.pkl"
        spec.write_bytes(pickle.dumps(config))
        cmd = [sys.executable, "-m", "sstmerge.worlds.pinned", world, str(cache_dir), str(spec), str(int(progress)),
               entry]
        rc = subprocess.run(cmd, env={**os.environ, **PINNED_ENV}).returncode
    if rc != 0:
        raise RuntimeError(f"building the {world} world's {entry} under pinned numerics failed (exit status {rc})")


def _main(argv: list[str]) -> int:
    from . import module

    world, cache_dir, spec, progress, entry = argv
    if not is_pinned():
        raise RuntimeError(f"sstmerge.worlds.pinned runs under {PINNED_ENV}; call pinned.build() instead")
    config = pickle.loads(Path(spec).read_bytes())
    if entry not in ("ensure", "aligned_pair"):
        raise RuntimeError(f"sstmerge.worlds.pinned: unknown entry {entry!r}")
    getattr(module(world), entry)(cache_dir, config=config, progress=bool(int(progress)))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
