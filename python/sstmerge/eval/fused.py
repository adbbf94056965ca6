"""Evaluate a LoRA adapter through fused weights: ``W <- W0 + s B A`` in place, then ``W0`` back.

    with FusedAdapters(model) as fuse:
        with fuse(adapter_dir):      # the model now computes with W0 + s B A in every target layer
            evaluate(model)
        # W0 again, bit for bit

A peft wrapper computes ``x W0^T + s (x A^T) B^T`` with two extra small products and Python
dispatch in every target layer; on a CPU with a 135M-parameter model that costs ~30 % of the
evaluation (measured: docs/models.md, SmolLM2 section). Fusing computes ``x (W0 + s B A)^T``
instead — the same function up to round-off (one rounding of the fused weight to its dtype, by
:func:`sstmerge.ops.lora_merge_`). The original weights of the touched layers are copied to host
memory once, on first use, and copied back after each adapter, so adapters never accumulate
round-off. Adapters that fusing cannot express (DoRA, trained biases, modules_to_save) are refused
by :func:`sstmerge.adapters.load_adapter`.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch

from ..adapters import load_adapter
from ..errors import InputError
from ..ops import lora_merge_


class FusedAdapters:
    """Applies adapters to ``model`` one at a time (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, backend: str = "auto"):
        self.model = model
        self.backend = backend
        self.saved: dict[str, torch.Tensor] = {}

    def __enter__(self) -> "FusedAdapters":
        return self

    def __exit__(self, *exc) -> None:
        self.restore()
        self.saved.clear()

    def _weight(self, name: str, what: str) -> torch.Tensor:
        try:
            mod = self.model.get_submodule(name)
        except AttributeError:
            raise InputError(f"{what}: layer {name} is not in the model; the adapter was trained on another base") from None
        w = getattr(mod, "weight", None)
        if not isinstance(w, torch.Tensor) or w.ndim != 2:
            raise InputError(f"{what}: {name} has no 2-d weight to fuse into")
        return w

    def restore(self, names=None) -> None:
        """The touched weights (or ``names``) back to their original values (exact copies)."""
        with torch.no_grad():
            for name in (self.saved if names is None else [n for n in names if n in self.saved]):
                w = self._weight(name, "restore")
                w.copy_(self.saved[name].to(w.device))

    @contextmanager
    def __call__(self, adapter: str | Path):
        what = f"adapter {adapter}"
        ad = load_adapter(adapter, what=what)
        with torch.no_grad():
            try:
                for name, layer in ad.layers.items():
                    w = self._weight(name, what)
                    if tuple(w.shape) != layer.shape:
                        raise InputError(f"{what}: layer {name} is {layer.shape}, the model's weight {tuple(w.shape)}")
                    if name not in self.saved:
                        self.saved[name] = w.detach().to("cpu", copy=True)
                    lora_merge_(w, layer.B.to(w.device), layer.A.to(w.device), float(layer.scale), backend=self.backend)
                yield self.model
            finally:
                self.restore(ad.layers)
