"""A small world for the merge tests: a random 2-layer Llama saved with save_pretrained, two peft
LoRA adapters trained on nothing (random factors, init_lora_weights=False), and Fisher results
shaped like sstmerge.fisher's (diag target='linear', subspace and kfac in the joint subspace),
built directly. Imported by the other test_merge*.py files; the checks here are about the world
itself."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

TARGETS = ["q_proj", "v_proj", "down_proj"]


@dataclass
class World:
    root: Path
    base: Path
    utility: Path
    safety: Path
    fisher: dict  # (role, kind) -> FisherResult-shaped object
    aligned: Path | None = None  # the base with an independent low-rank update fused in (an aligned twin)

    def options(self, method: str) -> dict:
        """The options a method needs here: the aligned/unaligned pair for the published Safe LoRA and SafeMERGE."""
        return {"align_model": str(self.aligned)} if method in ("safe_lora", "safemerge") else {}


def make_base(path: Path, *, hidden=64, layers=2, seed=0, vocab=64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=96, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    m = LlamaForCausalLM(cfg)
    m.save_pretrained(path)
    return path


def make_adapter(base: Path, path: Path, *, r=4, alpha=8, seed=1, targets=TARGETS, rslora=False):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    m = LlamaForCausalLM.from_pretrained(base)
    torch.manual_seed(seed)
    pm = get_peft_model(m, LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=False,
                                      use_rslora=rslora))
    with torch.no_grad():  # peft's random init gives small B; make the updates sizeable
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    pm.save_pretrained(path)
    return path


def make_aligned(base: Path, adapter: Path, path: Path) -> Path:
    """``base`` with ``adapter``'s update fused into its weights: a model that is base + a low-rank update."""
    from sstmerge.adapters import load_adapter
    from sstmerge.merge.core import LayerFactors
    from sstmerge.merge.writers import ModelFiles, write_fused

    layers = {n: LayerFactors(l.B, l.A, l.scale) for n, l in load_adapter(adapter).layers.items()}
    write_fused(ModelFiles(base), path, layers, backend="torch")
    return path


def psd(n, gen, scale=1.0):
    X = torch.randn(n, n + 3, generator=gen, dtype=torch.float64)
    return (scale * X @ X.T / n).float()


def make_fisher(utility: Path, safety: Path, base: Path, seed=5) -> dict:
    from sstmerge import adapters as ad
    from sstmerge.merge.writers import ModelFiles

    U, S = ad.load_adapter(utility), ad.load_adapter(safety)
    sub = ad.joint_subspace(U, S)
    shapes = ModelFiles(base).linear_shapes()
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for role in ("utility", "safety"):
        diag, diag_base, subs, kfac = {}, {}, {}, {}
        for name, (qi, qo) in sub.items():
            O, I = shapes[name]
            diag[f"base_model.model.{name}.base_layer.weight"] = torch.rand(O, I, generator=gen) ** 2
            # the Fisher at the base model (SST's default point) is another statistic: its own draw
            diag_base[f"base_model.model.{name}.base_layer.weight"] = torch.rand(O, I, generator=gen) ** 2
            n = qi.shape[1] * qo.shape[1]
            subs[f"{name}.fisher"] = psd(n, gen)
            subs[f"{name}.q_in"], subs[f"{name}.q_out"] = qi.clone(), qo.clone()
            kfac[f"{name}.A"] = psd(qi.shape[1], gen)
            kfac[f"{name}.G"] = psd(qo.shape[1], gen)
            kfac[f"{name}.q_in"], kfac[f"{name}.q_out"] = qi.clone(), qo.clone()
        meta = {"layers": json.dumps(sorted(sub))}
        out[(role, "diag")] = SimpleNamespace(kind="diag", tensors=diag, meta=dict(meta))
        out[(role, "diag@base")] = SimpleNamespace(kind="diag", tensors=diag_base, meta=dict(meta))
        out[(role, "subspace")] = SimpleNamespace(kind="subspace", tensors=subs, meta=dict(meta))
        out[(role, "kfac")] = SimpleNamespace(kind="kfac", tensors=kfac, meta=dict(meta))
    return out


def build_world(root: Path) -> World:
    root.mkdir(parents=True, exist_ok=True)
    base = make_base(root / "base")
    utility = make_adapter(base, root / "utility", r=4, alpha=8, seed=1)
    safety = make_adapter(base, root / "safety", r=4, alpha=4, seed=2, rslora=True)
    aligned = make_aligned(base, make_adapter(base, root / "twin", r=3, alpha=3, seed=3), root / "aligned")
    return World(root, base, utility, safety, make_fisher(utility, safety, base), aligned)


_BUILT: list[World] = []


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> World:
    # imported into several test modules (each gets its own fixture definition): build it once
    if not _BUILT:
        _BUILT.append(build_world(tmp_path_factory.mktemp("merge_world")))
    return _BUILT[0]


def test_world_adapters_are_nonzero_and_distinct(world):
    from sstmerge import adapters as ad

    U, S = ad.load_adapter(world.utility), ad.load_adapter(world.safety)
    assert sorted(U.layers) == sorted(S.layers) and len(U.layers) == 2 * len(TARGETS)
    for n in U.layers:
        assert U.layers[n].delta().abs().max() > 1e-3
        assert (U.layers[n].delta() - S.layers[n].delta()).abs().max() > 1e-3
