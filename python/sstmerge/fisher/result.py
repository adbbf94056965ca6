"""FisherResult: the tensors of a Fisher estimate, its metadata, and their safetensors file.

A file holds the flat fp32 tensors and, in the safetensors metadata, ``meta`` plus three entries of
its own: ``sstmerge.format`` (the file format), ``sstmerge.kind`` and ``sstmerge.checksum`` (sha256
over the tensor names, shapes, dtypes and bytes in sorted name order). ``load`` recomputes the
checksum, so a truncated or altered file, or one that is not a Fisher file, is an InputError rather
than wrong numbers.

A FisherResult is a read-only mapping of its tensors (``name in r``, ``r[name]``, ``len(r)``,
iteration, ``r.keys()``). ``load`` is lazy: it streams the file once to verify the checksum (one
tensor in memory at a time), then reads each tensor from the file when it is asked for, so a
multi-GB Fisher file never sits in host memory whole.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterator, Mapping
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


def checksum(tensors: Mapping[str, Tensor]) -> str:
    """sha256 over (name, shape, dtype, bytes) in sorted name order; reads one tensor at a time."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k]
        h.update(f"{k}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(tensor_bytes(t))
        del t
    return h.hexdigest()


class LazyTensors(Mapping):
    """The tensors of a safetensors file, each read (and moved to ``device``) when it is asked for."""

    def __init__(self, path: str, device: Optional[str] = None):
        from safetensors import safe_open

        # one open handle (a memory map): reads come from the file that was verified, even if the
        # path is later replaced by another file
        self.path, self.device = path, device
        self._f = safe_open(path, framework="pt", device="cpu")
        self._names = list(self._f.keys())
        self._set = frozenset(self._names)

    def metadata(self) -> dict:
        return dict(self._f.metadata() or {})

    def __getitem__(self, key: str) -> Tensor:
        if key not in self._set:
            raise KeyError(key)
        t = self._f.get_tensor(key)
        return t.to(self.device) if self.device is not None else t

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, key) -> bool:
        return key in self._set


@dataclasses.dataclass(eq=False)
class FisherResult(Mapping):
    """A Fisher estimate; a read-only mapping name -> tensor.

    kind: "diag", "subspace" or "kfac" (see :mod:`sstmerge.fisher.estimator` for the definitions).
    tensors: flat mapping of fp32 CPU tensors (safetensors-ready; a :class:`LazyTensors` after load).
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

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def __contains__(self, key) -> bool:
        return key in self.tensors

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically to ``path`` (safetensors, metadata included)."""
        from safetensors.torch import save_file

        if self.kind not in KINDS:
            raise InputError(f"FisherResult.kind must be one of {KINDS}, got {self.kind!r}")
        bad = {k: type(v).__name__ for k, v in self.meta.items() if not isinstance(v, str)}
        if bad:
            raise InputError(f"FisherResult.meta values must be str; not str: {bad}")
        tensors = {k: self.tensors[k].detach().cpu().contiguous() for k in self.tensors}
        md = {k: v for k, v in self.meta.items() if k not in _RESERVED}
        md.update({"sstmerge.format": FORMAT, "sstmerge.kind": self.kind,
                   "sstmerge.checksum": checksum(tensors)})
        with io.atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=md)

    @classmethod
    def load(cls, path: str | os.PathLike, device: Optional[str] = None) -> "FisherResult":
        """Open a file written by :meth:`save` (lazily: tensors are read when asked for); a
        missing, corrupt or foreign file is an InputError. The checksum is verified here, reading
        the file once with one tensor in memory at a time."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise InputError(f"Fisher file {path} does not exist")
        try:
            tensors = LazyTensors(path, device)
            md = tensors.metadata()
            if md.get("sstmerge.format") != FORMAT:
                raise InputError(f"{path} is not an sstmerge Fisher file (format "
                                 f"{md.get('sstmerge.format')!r}, expected {FORMAT!r})")
            ok = md.get("sstmerge.checksum") == checksum(LazyTensors(path))
        except InputError:
            raise
        except Exception as e:  # safetensors raises its own error types for malformed files
            raise InputError(f"Fisher file {path} is corrupt or not a safetensors file ({e}); "
                             "delete it and estimate again") from None
        if not ok:
            raise InputError(f"Fisher file {path} is corrupt (checksum mismatch); delete it and "
                             "estimate again")
        kind = md.get("sstmerge.kind")
        if kind not in KINDS:
            raise InputError(f"Fisher file {path} has unknown kind {kind!r}")
        meta = {k: v for k, v in md.items() if k not in _RESERVED}
        return cls(kind, tensors, meta)
