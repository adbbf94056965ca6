"""Reading a base model's safetensors shards tensor by tensor, and writing the fused model.

:class:`ModelFiles` indexes a model directory's shards from their headers (no tensor data read).
:func:`write_fused` writes a copy of the model directory in which every merged layer's weight is
``W0 + scale * B @ A``, computed in place by :func:`sstmerge.ops.lora_merge_` (fp32 product, one
rounding to the weight's dtype). Shards are streamed: a shard's header is copied unchanged (dtypes,
shapes and offsets do not change), then each tensor is either copied byte for byte or read, merged
and written — one tensor in memory at a time, never two copies of the model.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from typing import Mapping

import torch

from ..adapters import read_safetensors_header
from ..errors import InputError

_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def resolve_model_dir(base: str) -> Path:
    """A local model directory for ``base``: a directory, a registry name ("tiny", "mistral-7b", ...)
    or a Hugging Face id already available offline (see :func:`sstmerge.models.resolve_model_dir`)."""
    p = Path(base)
    if p.is_dir():
        return p
    from ..models import resolve_model_dir as _resolve
    from ..worlds import resolve_model

    return Path(_resolve(resolve_model(base)))


class ModelFiles:
    """The safetensors shards of a model directory: key -> (shard, dtype, shape)."""

    def __init__(self, path: str | Path, what: str = "base model"):
        self.path = Path(path)
        self.what = what
        shards = sorted(self.path.glob("*.safetensors"))
        if not shards:
            hint = " (only .bin weights found: weights load from safetensors only)" if list(self.path.glob("*.bin")) else ""
            raise InputError(f"{what} {self.path} has no *.safetensors weights{hint}")
        self.shards = shards
        self.headers: dict[Path, dict] = {}
        self.where: dict[str, Path] = {}
        for sh in shards:
            h = read_safetensors_header(sh, what)
            self.headers[sh] = h
            for k in h:
                if k != "__metadata__":
                    self.where[k] = sh

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.headers[self.where[key]][key]["shape"])

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """``{layer: (O, I)}`` for every 2-D ``<layer>.weight`` tensor."""
        out = {}
        for k, sh in self.where.items():
            if k.endswith(".weight"):
                s = self.headers[sh][k]["shape"]
                if len(s) == 2:
                    out[k[: -len(".weight")]] = (int(s[0]), int(s[1]))
        return out

    def get(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        if key not in self.where:
            raise InputError(f"{self.what} {self.path} has no tensor {key!r}")
        with safe_open(str(self.where[key]), "pt", device="cpu") as f:
            return f.get_tensor(key)


def _tensor_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def write_fused(src: ModelFiles, dst: Path, layers: Mapping[str, object], *, backend: str = "auto",
                progress: bool = False) -> dict:
    """Write the model of ``src`` with ``W += scale * B @ A`` for each ``layers[name]`` into ``dst``.

    Non-weight files (config, tokenizer, generation config, shard index) are copied unchanged."""
    from safetensors import safe_open

    from ..ops import lora_merge_

    dst.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.path.iterdir()):
        if f.is_file() and f.suffix != ".safetensors" and f.suffix != ".bin" and not f.name.startswith("."):
            shutil.copy2(f, dst / f.name)
    todo = {f"{name}.weight": f for name, f in layers.items() if getattr(f, "rank", 1) > 0}
    missing = [k for k in todo if k not in src.where]
    if missing:
        raise InputError(f"{src.what} {src.path} has no weight {missing[0]!r}; the adapters belong to another base model")
    merged = 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="fuse", unit="layer", leave=False)
    for sh in src.shards:
        header = src.headers[sh]
        with open(sh, "rb") as fin:
            n = struct.unpack("<Q", fin.read(8))[0]
            raw_header = fin.read(n)
            data_start = 8 + n
        entries = sorted(((k, v) for k, v in header.items() if k != "__metadata__"), key=lambda kv: kv[1]["data_offsets"][0])
        out_path = dst / sh.name
        with open(sh, "rb") as fin, open(out_path, "wb") as fout, safe_open(str(sh), "pt", device="cpu") as st:
            fout.write(struct.pack("<Q", n))
            fout.write(raw_header)
            pos = 0
            for k, v in entries:
                a, b = v["data_offsets"]
                if a != pos:  # padding between tensors (not written by safetensors, but allowed)
                    fin.seek(data_start + pos)
                    fout.write(fin.read(a - pos))
                if k in todo:
                    f = todo[k]
                    if v["dtype"] not in _DTYPES:
                        raise InputError(f"{src.what}: weight {k} has dtype {v['dtype']}, which cannot be merged into")
                    w = st.get_tensor(k)
                    B, A = f.B.to(torch.float32), f.A.to(torch.float32)
                    with torch.no_grad():
                        lora_merge_(w, B, A, float(f.scale), backend=backend)
                    buf = _tensor_bytes(w)
                    if len(buf) != b - a:
                        raise RuntimeError(f"fused weight {k} has {len(buf)} bytes, the header says {b - a}")
                    fout.write(buf)
                    merged += 1
                    if bar is not None:
                        bar.update(1)
                    del w
                else:
                    fin.seek(data_start + a)
                    remaining = b - a
                    while remaining:
                        chunk = fin.read(min(remaining, 64 << 20))
                        if not chunk:
                            raise InputError(f"{src.what}: {sh} is truncated; re-download it")
                        fout.write(chunk)
                        remaining -= len(chunk)
                pos = b
    if bar is not None:
        bar.close()
    if merged != len(todo):
        raise RuntimeError(f"fused {merged} of {len(todo)} layers")
    return {"fused_layers": merged, "shards": [s.name for s in src.shards]}


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, allow_nan=False) + "\n", encoding="utf-8")
