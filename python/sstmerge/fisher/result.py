"""FisherResult: the tensors of a Fisher estimate, its metadata, and their safetensors file.

A file holds the flat fp32 tensors and, in the safetensors metadata, ``meta`` plus three entries of
its own: ``sstmerge.format`` (the file format), ``sstmerge.kind`` and ``sstmerge.checksum`` (sha256
over the tensor names, shapes, dtypes and bytes in sorted name order). ``load`` recomputes the
checksum, so a truncated or altered file, or one that is not a Fisher file, is an InputError rather
than wrong numbers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Optional

import torch
from torch import Tensor

from .. import io
from ..errors import InputError

FORMAT = "sstmerge.fisher/1"
KINDS = ("diag", "subspace", "kfac")
_RESERVED = ("sstmerge.format", "sstmerge.kind", "sstmerge.checksum")


def tensor_bytes(t: Tensor) -> bytes:
    t = t.detach().cpu().contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes()


def checksum(tensors: dict[str, Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k]
        h.update(f"{k}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(tensor_bytes(t))
    return h.hexdigest()


@dataclasses.dataclass
class FisherResult:
    """A Fisher estimate.

    kind: "diag", "subspace" or "kfac" (see :mod:`sstmerge.fisher.estimator` for the definitions).
    tensors: flat dict of fp32 CPU tensors (safetensors-ready).
    meta: str -> str (model, config hash, adapter, data hash, options, n_samples, n_tokens, peak
    memory, and ``layers``: a JSON list of the covered layer names).
    """

    kind: str
    tensors: dict[str, Tensor]
    meta: dict[str, str] = dataclasses.field(default_factory=dict)

    def layers(self) -> list[str]:
        """The covered layers (base-model module names), in model order."""
        if "layers" in self.meta:
            return list(json.loads(self.meta["layers"]))
        raise InputError("this FisherResult has no 'layers' entry in its metadata")

    def __getitem__(self, key: str) -> Tensor:
        return self.tensors[key]

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically to ``path`` (safetensors, metadata included)."""
        from safetensors.torch import save_file

        if self.kind not in KINDS:
            raise InputError(f"FisherResult.kind must be one of {KINDS}, got {self.kind!r}")
        bad = {k: type(v).__name__ for k, v in self.meta.items() if not isinstance(v, str)}
        if bad:
            raise InputError(f"FisherResult.meta values must be str; not str: {bad}")
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.tensors.items()}
        md = {k: v for k, v in self.meta.items() if k not in _RESERVED}
        md.update({"sstmerge.format": FORMAT, "sstmerge.kind": self.kind,
                   "sstmerge.checksum": checksum(tensors)})
        with io.atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=md)

    @classmethod
    def load(cls, path: str | os.PathLike, device: Optional[str] = None) -> "FisherResult":
        """Read a file written by :meth:`save`; a missing, corrupt or foreign file is an InputError."""
        from safetensors import safe_open

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise InputError(f"Fisher file {path} does not exist")
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                md = dict(f.metadata() or {})
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error types for malformed files
            raise InputError(f"Fisher file {path} is corrupt or not a safetensors file ({e}); "
                             "delete it and estimate again") from None
        if md.get("sstmerge.format") != FORMAT:
            raise InputError(f"{path} is not an sstmerge Fisher file (format "
                             f"{md.get('sstmerge.format')!r}, expected {FORMAT!r})")
        if md.get("sstmerge.checksum") != checksum(tensors):
            raise InputError(f"Fisher file {path} is corrupt (checksum mismatch); delete it and "
                             "estimate again")
        kind = md.get("sstmerge.kind")
        if kind not in KINDS:
            raise InputError(f"Fisher file {path} has unknown kind {kind!r}")
        meta = {k: v for k, v in md.items() if k not in _RESERVED}
        if device is not None:
            tensors = {k: v.to(device) for k, v in tensors.items()}
        return cls(kind, tensors, meta)
