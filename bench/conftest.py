"""Benchmark session: quick/full mode, the ratio table at the end, results JSON in full mode."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import _timing  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--full", action="store_true",
                     help="DESIGN.md section 8 shapes, more rounds, write bench/results/*.json")


def _mode(config) -> _timing.Mode:
    full = config.getoption("--full") or os.environ.get("SSTMERGE_BENCH", "quick") == "full"
    return _timing.FULL if full else _timing.QUICK


@pytest.fixture(scope="session")
def mode(pytestconfig) -> _timing.Mode:
    return _mode(pytestconfig)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    bs = getattr(config, "_benchmarksession", None)
    if bs is None or not bs.benchmarks:
        return
    tables = _timing.ratio_tables(bs.benchmarks)
    m = _timing.machine()
    terminalreporter.write_line(
        f"\nmachine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['threads']} threads), "
        f"cpp isa {m['cpp_isa']}, load {m['load_avg']}, mode {_mode(config).name}")
    terminalreporter.write_line(_timing.format_tables(tables))
    if _mode(config).full:
        for p in _timing.write_results(tables):
            terminalreporter.write_line(f"wrote {p}")
