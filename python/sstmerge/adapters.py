"""LoRA adapter I/O and the joint subspace of two adapters.

A peft LoRA adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors``. For
every target linear layer ``L`` (a module name of the base model, e.g.
``model.layers.0.self_attn.q_proj``) it stores ``A`` [r, I] and ``B`` [O, r]; the update it applies is

    dW_L = scale_L * B_L @ A_L,   scale_L = alpha_L / r_L   (alpha_L / sqrt(r_L) with use_rslora)

with ``r_L``/``alpha_L`` taken from ``rank_pattern``/``alpha_pattern`` when they name the layer.

:func:`load_adapter` reads such a directory into :class:`LoraAdapter` (fp32 factors on the CPU) and
checks it; :func:`check_pair` checks that two adapters can be merged; :func:`save_adapter` writes
per-layer factors back as a peft directory (any rank per layer); :func:`joint_subspace` gives the
orthonormal bases in which both updates live exactly. Every problem is a one-line InputError.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor

from .errors import InputError

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_KEY = re.compile(r"^base_model\.model\.(?P<layer>.+)\.lora_(?P<ab>[AB])(?:\.(?P<name>[^.]+))?\.weight$")

#: Relative tolerance of the rank-revealing orthonormalisation in :func:`joint_subspace`: a direction
#: whose singular value is below ``ORTH_RTOL * largest singular value`` is dropped (it carries no
#: part of either update beyond fp32 round-off).
ORTH_RTOL = 1e-6


@dataclass
class LoraLayer:
    """One layer's update ``scale * B @ A`` (A [r, I], B [O, r], fp32)."""

    A: Tensor
    B: Tensor
    scale: float

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """(O, I) of the layer's weight."""
        return int(self.B.shape[0]), int(self.A.shape[1])

    def delta(self) -> Tensor:
        """The dense update ``scale * B @ A`` [O, I] (for one layer at a time only)."""
        return self.scale * (self.B @ self.A)


@dataclass
class LoraAdapter:
    path: Path | None
    config: dict
    layers: dict[str, LoraLayer] = field(default_factory=dict)

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    @property
    def target_modules(self) -> list[str]:
        return sorted(self.layers)

    def describe(self) -> str:
        return str(self.path) if self.path is not None else "<in memory>"


# ----------------------------------------------------------------------------------------- reading

def _pattern_value(patterns: Mapping[str, object], layer: str, default):
    """peft's rule: the first pattern key ``k`` with ``re.match(rf"(.*\\.)?({k})$", layer)``."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", layer):
            return value
    return default


def read_safetensors_header(path: Path, what: str) -> dict:
    """Parse a safetensors header (no tensor data read); a damaged file is an InputError."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ValueError("file shorter than 8 bytes")
            (n,) = struct.unpack("<Q", raw)
            size = path.stat().st_size
            if n > size - 8 or n > 100_000_000:
                raise ValueError(f"header length {n} exceeds the file size {size}")
            header = json.loads(f.read(n))
        end = 0
        for k, v in header.items():
            if k == "__metadata__":
                continue
            end = max(end, int(v["data_offsets"][1]))
        if 8 + n + end > size:
            raise ValueError(f"tensor data ends at byte {8 + n + end}, file has {size}")
        return header
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - any parse failure means a corrupt file
        raise InputError(f"{what}: {path} is not a valid safetensors file ({e}); re-save or re-download it") from e


def load_adapter(path: str | Path, *, what: str = "adapter") -> LoraAdapter:
    """Read a peft LoRA adapter directory into fp32 CPU factors, checking it on the way."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_dir():
        raise InputError(f"{what}: {path} is not a directory; pass a peft adapter directory (save_pretrained output)")
    cfg_path, w_path = path / CONFIG, path / WEIGHTS
    if not cfg_path.is_file():
        raise InputError(f"{what}: {cfg_path} is missing; pass a peft LoRA adapter directory")
    if not w_path.is_file():
        hint = " (.bin weights are not loaded: convert them to safetensors)" if (path / "adapter_model.bin").exists() else ""
        raise InputError(f"{what}: {w_path} is missing{hint}")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except Exception as e:  # noqa: BLE001
        raise InputError(f"{what}: {cfg_path} is not valid JSON ({e}); re-save the adapter") from e
    if str(config.get("peft_type", "")).upper() != "LORA":
        raise InputError(f"{what}: {path} is a {config.get('peft_type')!r} adapter; only LoRA adapters can be merged")
    for flag in ("use_dora", "fan_in_fan_out"):
        if config.get(flag):
            raise InputError(f"{what}: {path} sets {flag}=true, which sstmerge does not merge; use a plain LoRA adapter")
    if config.get("modules_to_save"):
        raise InputError(f"{what}: {path} also trains full modules ({config['modules_to_save']}); only LoRA factors can be merged")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        raise InputError(f"{what}: {path} trains biases; only bias='none' LoRA adapters can be merged")
    try:
        r_default = int(config["r"])
        alpha_default = float(config["lora_alpha"])
    except Exception as e:  # noqa: BLE001
        raise InputError(f"{what}: {cfg_path} lacks a valid 'r'/'lora_alpha' ({e})") from e
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    rslora = bool(config.get("use_rslora"))

    header = read_safetensors_header(w_path, what)
    factors: dict[str, dict[str, Tensor]] = {}
    try:
        with safe_open(str(w_path), "pt", device="cpu") as f:
            for key in f.keys():
                m = _KEY.match(key)
                if m is None:
                    raise InputError(f"{what}: {w_path} holds {key!r}, which is not a LoRA A/B factor; only plain LoRA adapters can be merged")
                t = f.get_tensor(key)
                factors.setdefault(m["layer"], {})[m["ab"]] = t
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001
        raise InputError(f"{what}: cannot read {w_path} ({e}); re-save the adapter") from e
    del header
    if not factors:
        raise InputError(f"{what}: {w_path} holds no LoRA factors")

    layers: dict[str, LoraLayer] = {}
    for name, ab in sorted(factors.items()):
        if set(ab) != {"A", "B"}:
            raise InputError(f"{what}: layer {name} has only lora_{''.join(ab)} in {w_path}; the file is incomplete")
        A, B = ab["A"], ab["B"]
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise InputError(f"{what}: layer {name} has A {tuple(A.shape)} and B {tuple(B.shape)}, which do not form a LoRA pair")
        A, B = A.float(), B.float()
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            raise InputError(f"{what}: layer {name} of {w_path} holds NaN or Inf values; retrain or re-save the adapter")
        r = int(_pattern_value(rank_pattern, name, r_default))
        if r != A.shape[0]:
            raise InputError(f"{what}: layer {name} has rank {A.shape[0]} in {w_path} but {r} in {cfg_path}; the files do not belong together")
        alpha = float(_pattern_value(alpha_pattern, name, alpha_default))
        scale = alpha / math.sqrt(r) if rslora else alpha / r
        layers[name] = LoraLayer(A=A.contiguous(), B=B.contiguous(), scale=scale)
    return LoraAdapter(path=path, config=config, layers=layers)


def _same_base_name(a: str | None, b: str | None) -> bool:
    if not a or not b:
        return True
    if a == b:
        return True
    pa, pb = Path(a), Path(b)
    if pa.exists() and pb.exists():
        return pa.resolve() == pb.resolve()
    return False


def check_pair(utility: LoraAdapter, safety: LoraAdapter, *, equal_ranks: bool = False) -> None:
    """Check that two adapters can be merged: same base model, same target layers, same shapes
    (and the same rank per layer when ``equal_ranks``)."""
    if not _same_base_name(utility.base_model, safety.base_model):
        raise InputError(
            f"the utility adapter was trained on {utility.base_model!r} but the safety adapter on {safety.base_model!r}; "
            "merge adapters of the same base model")
    lu, ls = set(utility.layers), set(safety.layers)
    if lu != ls:
        only_u, only_s = sorted(lu - ls), sorted(ls - lu)
        raise InputError(
            f"the adapters target different modules (only utility: {only_u[:3]}{'...' if len(only_u) > 3 else ''}, "
            f"only safety: {only_s[:3]}{'...' if len(only_s) > 3 else ''}); train both on the same target_modules")
    for name in sorted(lu):
        u, s = utility.layers[name], safety.layers[name]
        if u.shape != s.shape:
            raise InputError(f"layer {name} is {u.shape[0]}x{u.shape[1]} in the utility adapter but {s.shape[0]}x{s.shape[1]} "
                             "in the safety adapter; they were trained on different base models")
        if equal_ranks and u.rank != s.rank:
            raise InputError(f"layer {name} has rank {u.rank} in the utility adapter but {s.rank} in the safety adapter; "
                             "this method needs equal ranks")


def check_against_base(adapter: LoraAdapter, shapes: Mapping[str, tuple[int, int]], base: str, what: str) -> None:
    """Check that every adapter layer is a linear weight of the base model with matching shape.

    ``shapes`` maps a base-model layer name to its weight shape (O, I)."""
    for name, layer in adapter.layers.items():
        if name not in shapes:
            raise InputError(f"{what}: layer {name} does not exist in base model {base}; the adapter belongs to another base model")
        if tuple(shapes[name]) != layer.shape:
            raise InputError(f"{what}: layer {name} is {layer.shape[0]}x{layer.shape[1]} but {tuple(shapes[name])[0]}x{tuple(shapes[name])[1]} "
                             f"in base model {base}; the adapter belongs to another base model")


# ------------------------------------------------------------------------------------------ writing

def save_adapter(path: str | Path, layers: Mapping[str, tuple[Tensor, Tensor, float]], *, base_model: str | None = None,
                 extra: Mapping[str, object] | None = None) -> None:
    """Write per-layer factors ``{layer: (B [O,k], A [k,I], scale)}`` as a peft LoRA directory.

    The scale is folded into B (lora_B = scale * B) and every layer gets ``lora_alpha = r = k``
    through ``rank_pattern``/``alpha_pattern``, so peft's scaling is exactly 1 and the applied update
    is ``scale * B @ A`` up to the one rounding of the folded product. Layers with k = 0 (no update)
    are left out of ``target_modules``, which lists exact module names. ``path`` must exist (the
    caller writes inside an atomic directory).
    """
    from safetensors.torch import save_file

    path = Path(path)
    tensors: dict[str, Tensor] = {}
    ranks: dict[str, int] = {}
    for name in sorted(layers):
        B, A, scale = layers[name]
        k = int(A.shape[0])
        if k == 0:
            continue
        if B.shape[1] != k:
            raise ValueError(f"save_adapter: layer {name}: B {tuple(B.shape)} and A {tuple(A.shape)} do not match")
        tensors[f"{_PREFIX}{name}.lora_A.weight"] = A.float().contiguous()
        tensors[f"{_PREFIX}{name}.lora_B.weight"] = (float(scale) * B.float()).contiguous()
        ranks[name] = k
    if not ranks:
        raise ValueError("save_adapter: every layer has rank 0; there is no adapter to write")
    counts: dict[int, int] = {}
    for k in ranks.values():
        counts[k] = counts.get(k, 0) + 1
    r0 = max(counts, key=lambda k: (counts[k], k))
    pattern = {re.escape(n): k for n, k in ranks.items() if k != r0}
    config = {
        "peft_type": "LORA",
        "base_model_name_or_path": base_model,
        "r": r0,
        "lora_alpha": r0,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": sorted(ranks),
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "task_type": None,
    }
    if extra:
        config.update(extra)
    save_file(tensors, str(path / WEIGHTS), metadata={"format": "pt"})
    (path / CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------------- joint subspace

def orth(m: Tensor, rtol: float = ORTH_RTOL) -> Tensor:
    """Orthonormal basis of the column space of ``m`` (rank-revealing, fp64 SVD).

    Columns whose singular value is below ``rtol * s_max`` are dropped; a zero matrix gives an
    empty basis [n, 0]."""
    m64 = m.double()
    if m64.numel() == 0:
        return m64.new_zeros(m64.shape[0], 0).float()
    U, s, _ = torch.linalg.svd(m64, full_matrices=False)
    if s.numel() == 0 or s[0] == 0:
        return m64.new_zeros(m64.shape[0], 0).float()
    keep = int((s > rtol * s[0]).sum())
    return U[:, :keep].float().contiguous()


def _unit_columns(m: Tensor) -> Tensor:
    """Scale every nonzero column to unit norm, so the rank tolerance does not depend on how large
    one adapter's factors are relative to the other's."""
    n = m.double().norm(dim=0)
    return (m.double() / torch.where(n > 0, n, torch.ones_like(n))).float()


def joint_subspace(utility: LoraAdapter, safety: LoraAdapter, rtol: float = ORTH_RTOL) -> dict[str, tuple[Tensor, Tensor]]:
    """Per layer ``(q_in [I, m_i], q_out [O, m_o])`` with

        q_in  = orth([A_U^T, A_S^T]),   q_out = orth([B_U, B_S])        (m_i, m_o <= r_U + r_S)

    so both updates satisfy ``dX = q_out (q_out^T dX q_in) q_in^T`` exactly (to round-off).
    Orthonormalisation is rank-revealing: the columns are first scaled to unit norm, then
    directions with singular value below ``rtol * s_max`` are dropped (see :data:`ORTH_RTOL`); an
    all-zero factor (e.g. an untrained B) contributes no direction."""
    check_pair(utility, safety)
    return {name: joint_layer(utility.layers[name], safety.layers[name], rtol) for name in sorted(utility.layers)}


def joint_layer(u: LoraLayer, s: LoraLayer, rtol: float = ORTH_RTOL) -> tuple[Tensor, Tensor]:
    """``(q_in, q_out)`` of one layer (see :func:`joint_subspace`)."""
    q_in = orth(_unit_columns(torch.cat([u.A.T, s.A.T], dim=1)), rtol)
    q_out = orth(_unit_columns(torch.cat([u.B, s.B], dim=1)), rtol)
    return q_in, q_out
