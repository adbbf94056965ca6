"""sstmerge.ops.backends(): what was built, what is usable and why, and how requests resolve."""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys

import pytest
import torch

import sstmerge.ops as ops
from sstmerge.ops.backends import BACKENDS, resolve


def test_every_backend_has_usable_and_reason():
    st = ops.backends()
    assert set(st) == set(BACKENDS)
    for name, s in st.items():
        assert isinstance(s.usable, bool), name
        if s.usable:
            assert s.reason is None, name
        else:
            assert isinstance(s.reason, str) and s.reason, f"{name} unusable without a reason"
    assert st["torch"].usable and st["cpp"].usable, st


def test_report_built_backends(capsys):
    """Says which backends this install has (shown with pytest -s / in -ra summaries)."""
    from sstmerge import _C

    lines = [f"{n}: {'usable' if s.usable else 'unusable'} ({s.detail or s.reason})"
             for n, s in ops.backends().items()]
    lines.append(f"cpp ISA variants built={_C.built_isas()} runnable={_C.runnable_isas()} "
                 f"active={_C.isa()}; build_info={_C.build_info()}")
    print("\n".join(lines))
    assert "generic" in _C.built_isas() and _C.isa() in _C.runnable_isas()


def test_cuda_module_built_iff_nvcc():
    """_C_cuda exists exactly when the build found a CUDA compiler (unless the build was told
    SSTMERGE_CUDA=OFF, as the editable dev install is)."""
    from sstmerge import _C

    info = _C.build_info()
    if not info["cuda_requested"]:
        pytest.skip("built with -DSSTMERGE_CUDA=OFF: the CUDA module was not requested")
    try:
        importlib.import_module("sstmerge._C_cuda")
        importable = True
    except ImportError:
        importable = False
    assert importable == info["cuda_built"]
    assert importable == (shutil.which("nvcc") is not None or bool(os.environ.get("CUDACXX")))


def test_auto_on_cpu_is_cpp():
    assert resolve("auto", torch.device("cpu")) == "cpp"


def test_unusable_backend_raises_with_reason():
    st = ops.backends()
    unusable = [n for n, s in st.items() if not s.usable]
    if not unusable:
        pytest.skip("every backend is usable on this machine")
    for name in unusable:
        with pytest.raises(ops.BackendUnavailable, match="not usable here"):
            ops.diag_fisher_linear(torch.randn(1, 2, 3), torch.randn(1, 2, 4), backend=name)


def test_backend_for_other_device_raises():
    if not ops.backends()["cuda"].usable:  # cpp on a CUDA tensor needs a GPU; use the inverse
        with pytest.raises(ops.BackendUnavailable):
            resolve("cuda", torch.device("cpu"))
    else:
        with pytest.raises(ops.BackendUnavailable, match="does not run on cuda"):
            resolve("cpp", torch.device("cuda"))


def test_unknown_backend_is_value_error():
    with pytest.raises(ValueError, match="unknown backend"):
        ops.kfac_factor(torch.randn(3, 4), backend="blas")


def test_triton_backend_needs_interpreter_or_gpu():
    """conftest sets TRITON_INTERPRET=1, so triton is usable here when it is installed."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    st = ops.backends()["triton"]
    if importlib.util.find_spec("triton") is None:
        assert not st.usable and "not installed" in st.reason
    else:
        assert st.usable, st.reason


def _run_isa(isa: str) -> subprocess.CompletedProcess:
    """A fresh process with SSTMERGE_ISA=isa: prints the active variant, then runs an (empty)
    lora_merge_ through the dispatcher. Torch-free, so it starts fast."""
    empty = "(0, 0, [0, 0], [0, 1])"
    code = f"from sstmerge import _C; print(_C.isa()); _C.lora_merge_({empty}, {empty}, {empty}, 1.0, 1)"
    env = dict(os.environ, SSTMERGE_ISA=isa)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)


def test_isa_forced_by_env():
    """SSTMERGE_ISA picks the variant for the whole process; an unknown one is an error, not a
    fallback. (Each variant's results are tested per op through the isa= argument.)"""
    from sstmerge import _C

    for isa in _C.runnable_isas():
        r = _run_isa(isa)
        assert r.returncode == 0, r.stderr
        assert r.stdout.split() == [isa]
    r = _run_isa("sse9")
    assert r.returncode != 0 and "no CPU kernel variant 'sse9'" in r.stderr
