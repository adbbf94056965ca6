"""The benchmarks in quick mode, as CI runs them: every candidate of bench/ runs on small shapes and
is checked against its reference before it is timed. Quick mode asserts no timing target (targets
are for the DESIGN.md section 8 shapes: ``python -m pytest bench --full``); peers that are not
installed (BackPACK, Opacus) are skipped by their benchmark modules."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.mark.skipif(not (BENCH / "pytest.ini").exists(), reason="bench/ is not in this checkout")
def test_benchmarks_run_in_quick_mode():
    env = {k: v for k, v in os.environ.items() if k != "SSTMERGE_BENCH"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "."], cwd=BENCH, env=env,
                       capture_output=True, text=True, timeout=1200)
    tail = (r.stdout[-4000:] + r.stderr[-2000:]).strip()
    assert r.returncode == 0, tail
    assert " passed" in r.stdout and "mode quick" in r.stdout, tail
