"""Which kernel backends are usable here, and the choice behind ``backend="auto"``.

Backends:
  ``torch``  the pure-torch reference; always usable; every other backend is tested against it.
  ``cpp``    the compiled C++ CPU kernels (``sstmerge._C``), CPU tensors.
  ``cuda``   the compiled CUDA kernels (``sstmerge._C_cuda``), CUDA tensors.
  ``triton`` the Triton kernels (``sstmerge.kernels``), CUDA tensors, or CPU tensors when
             ``TRITON_INTERPRET=1`` runs them in the interpreter.

``auto`` picks, for a tensor's device, the first usable backend of: cpu -> cpp, torch;
cuda -> cuda, triton, torch. When ``auto`` ends on ``torch`` because a compiled backend is not
usable, a warning says why once. An explicitly requested backend that is not usable raises
:class:`BackendUnavailable` naming the reason; nothing falls back silently.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import warnings
from typing import NamedTuple, Sequence

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from ..errors import InputError

BACKENDS = ("torch", "cpp", "cuda", "triton")
_AUTO_ORDER = {"cpu": ("cpp", "torch"), "cuda": ("cuda", "triton", "torch")}
_DEVICES = {"torch": ("cpu", "cuda"), "cpp": ("cpu",), "cuda": ("cuda",), "triton": ("cuda", "cpu")}


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run here (the message says why)."""


class BackendStatus(NamedTuple):
    usable: bool
    reason: str | None  # why not usable (None when usable)
    detail: str | None = None  # e.g. the CPU ISA variant in use


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _import_compiled(name: str):
    """Import ``sstmerge.<name>``; returns (module, None) or (None, reason)."""
    try:
        return importlib.import_module(f"sstmerge.{name}"), None
    except ImportError as e:  # not built, or built for another Python
        return None, f"sstmerge.{name} could not be imported ({e})"


def _status(name: str) -> BackendStatus:
    if name == "torch":
        return BackendStatus(True, None, f"torch {torch.__version__}")
    if name == "cpp":
        mod, why = _import_compiled("_C")
        if mod is None:
            return BackendStatus(False, why + "; reinstall with `pip install .`")
        amx = mod.amx_unavailable() or "yes"  # bf16 lora_merge_ on AMX tiles
        if amx == "yes" and mod.isa() != "avx512":
            amx = f"unused by the {mod.isa()} variant"
        if amx == "yes" and os.environ.get("SSTMERGE_AMX") == "0":
            amx = "off (SSTMERGE_AMX=0)"
        return BackendStatus(
            True, None, f"isa={mod.isa()} built={','.join(mod.built_isas())} amx={amx}"
        )
    if name == "cuda":
        mod, why = _import_compiled("_C_cuda")
        if mod is None:
            return BackendStatus(
                False, "the CUDA module was not built (no CUDA compiler at install time): " + why
            )
        if not torch.cuda.is_available():
            return BackendStatus(False, "the CUDA module is built but torch sees no CUDA device")
        return BackendStatus(True, None, torch.cuda.get_device_name())
    if name == "triton":
        if importlib.util.find_spec("triton") is None:
            return BackendStatus(False, "triton is not installed (pip install 'sstmerge[triton]')")
        if not torch.cuda.is_available() and not _interpreting():
            return BackendStatus(
                False, "no CUDA device; set TRITON_INTERPRET=1 to run the kernels in the interpreter"
            )
        return BackendStatus(True, None, "interpreter" if _interpreting() else "gpu")
    raise InputError(f"unknown backend {name!r}; choose one of {BACKENDS} or 'auto'")


def backends() -> dict[str, BackendStatus]:
    """For each backend: whether it is usable here, and if not, why."""
    return {name: _status(name) for name in BACKENDS}


@functools.lru_cache(maxsize=None)
def _warn_auto_torch(device_type: str, reasons: str) -> None:
    warnings.warn(
        f"sstmerge: backend='auto' on {device_type} uses the torch reference because {reasons}",
        RuntimeWarning,
        stacklevel=3,
    )


def resolve(backend: str, device: torch.device) -> str:
    """The concrete backend that runs an op on tensors of ``device``."""
    dev = device.type
    if dev not in ("cpu", "cuda"):
        raise InputError(f"sstmerge ops run on cpu or cuda tensors, got device {device}")
    if backend == "auto":
        reasons = []
        for name in _AUTO_ORDER[dev]:
            st = _status(name)
            if st.usable and dev in _DEVICES[name]:
                if name == "torch" and reasons:
                    _warn_auto_torch(dev, "; ".join(reasons))
                return name
            reasons.append(f"{name}: {st.reason}")
        raise AssertionError("unreachable: torch is always usable")
    st = _status(backend)  # raises ValueError for unknown names
    if not st.usable:
        raise BackendUnavailable(f"backend {backend!r} is not usable here: {st.reason}")
    if dev not in _DEVICES[backend]:
        raise BackendUnavailable(
            f"backend {backend!r} does not run on {dev} tensors "
            f"(it runs on {', '.join(_DEVICES[backend])})"
        )
    return backend


def glue(backend: str):
    """The Python module that calls a backend's kernels (one function per op)."""
    return importlib.import_module(f"sstmerge.ops._{backend}")


def _plain_eager(tensors) -> bool:
    """Plain eager mode on plain tensors: no torch.compile tracing, no dispatch mode (fake tensors,
    meta or functional modes), no tensor subclass or functorch wrapper, nothing autograd tracks."""
    if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
        return False
    for t in tensors:
        if t is None:
            continue
        if (type(t) is not torch.Tensor or t.requires_grad
                or torch._C._functorch.is_functorch_wrapped_tensor(t)):
            return False
    return True


def dispatch(op, impl, *args, mutated: Sequence[torch.Tensor] = ()):
    """Run one op: ``impl(*args)`` (the body of the registered custom op ``op``) directly in plain
    eager mode, else through ``op`` (torch.compile, fake tensors, export, autograd-tracked inputs).

    Both run the same code. The direct call skips torch.library's Python dispatch layers, measured
    at 30 us per call with warm caches and ~150-200 us right after a kernel that streamed 32 MB
    (a tenth of a 4096 x 4096 bf16 lora_merge_). ``mutated`` tensors get their version counter
    bumped as the op's ADInplaceOrView kernel would."""
    if not _plain_eager(a for a in args if isinstance(a, torch.Tensor)):
        return op(*args)
    out = impl(*args)
    for t in mutated:
        torch.autograd.graph.increment_version(t)
    return out
