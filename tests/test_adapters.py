"""sstmerge.adapters: reading peft adapters, writing them back (any rank per layer), the joint
subspace, and the one-line errors for bad adapters."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from sstmerge import adapters as ad
from sstmerge.errors import InputError
from test_merge_world import make_adapter, make_base, world  # noqa: F401  (fixture)


def _peft_deltas(base, adapter_dir):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    pm = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), str(adapter_dir))
    out = {}
    for name, mod in pm.base_model.model.named_modules():
        if hasattr(mod, "get_delta_weight") and "default" in getattr(mod, "lora_A", {}):
            out[name] = mod.get_delta_weight("default").detach().double()
    return out


def test_load_matches_peft_delta_including_rslora(world):
    for path in (world.utility, world.safety):
        a = ad.load_adapter(path)
        peft = _peft_deltas(world.base, path)
        assert sorted(peft) == sorted(a.layers)
        for name, layer in a.layers.items():
            assert torch.allclose(layer.delta().double(), peft[name], rtol=1e-5, atol=1e-7), name
    s = ad.load_adapter(world.safety)
    assert s.config["use_rslora"] and all(math.isclose(L.scale, 4 / math.sqrt(4)) for L in s.layers.values())
    u = ad.load_adapter(world.utility)
    assert all(math.isclose(L.scale, 8 / 4) for L in u.layers.values())


def test_save_roundtrip_with_per_layer_ranks_loads_in_peft(world, tmp_path):
    U = ad.load_adapter(world.utility)
    gen = torch.Generator().manual_seed(3)
    layers = {}
    for i, (name, L) in enumerate(sorted(U.layers.items())):
        k = 1 + i  # a different rank in every layer
        O, I = L.shape
        layers[name] = (torch.randn(O, k, generator=gen), torch.randn(k, I, generator=gen), 0.5 + i)
    out = tmp_path / "a"
    out.mkdir()
    ad.save_adapter(out, layers, base_model=str(world.base))
    back = ad.load_adapter(out)
    peft = _peft_deltas(world.base, out)
    for name, (B, A, scale) in layers.items():
        want = scale * (B.double() @ A.double())
        assert back.layers[name].rank == A.shape[0]
        assert torch.allclose(back.layers[name].delta().double(), want, rtol=1e-5, atol=1e-6)
        assert torch.allclose(peft[name], want, rtol=1e-5, atol=1e-6)


def test_joint_subspace_holds_both_updates_and_is_rank_revealing(world):
    U, S = ad.load_adapter(world.utility), ad.load_adapter(world.safety)
    sub = ad.joint_subspace(U, S)
    for name, (qi, qo) in sub.items():
        assert qi.shape[1] == U.layers[name].rank + S.layers[name].rank  # generic random factors
        assert torch.allclose(qi.T @ qi, torch.eye(qi.shape[1]), atol=1e-5)
        assert torch.allclose(qo.T @ qo, torch.eye(qo.shape[1]), atol=1e-5)
        for L in (U.layers[name], S.layers[name]):
            d = L.delta()
            back = qo @ (qo.T @ d @ qi) @ qi.T
            assert (back - d).abs().max() <= 1e-5 * d.abs().max()
    # shared and null directions are dropped: S = U with its B doubled and one direction zeroed
    name = sorted(U.layers)[0]
    u = U.layers[name]
    s = ad.LoraLayer(A=u.A.clone(), B=torch.cat([2 * u.B[:, :-1], torch.zeros(u.B.shape[0], 1)], dim=1), scale=1.0)
    qi, qo = ad.joint_layer(u, s)
    assert qi.shape[1] == u.rank and qo.shape[1] == u.rank


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _err(fn, *a, **k) -> str:
    with pytest.raises(InputError) as e:
        fn(*a, **k)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_bad_adapters_are_one_line_errors(world, tmp_path):
    d = _copy(world.utility, tmp_path / "nocfg")
    (d / "adapter_config.json").unlink()
    assert "adapter_config.json is missing" in _err(ad.load_adapter, d)
    d = _copy(world.utility, tmp_path / "noweights")
    (d / "adapter_model.safetensors").unlink()
    assert "adapter_model.safetensors is missing" in _err(ad.load_adapter, d)
    d = _copy(world.utility, tmp_path / "trunc")
    w = d / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[:-100])
    assert "not a valid safetensors file" in _err(ad.load_adapter, d)
    d = _copy(world.utility, tmp_path / "garbage")
    (d / "adapter_model.safetensors").write_bytes(b"\x00" * 3)
    assert "not a valid safetensors file" in _err(ad.load_adapter, d)
    d = _copy(world.utility, tmp_path / "badjson")
    (d / "adapter_config.json").write_text("{not json")
    assert "not valid JSON" in _err(ad.load_adapter, d)
    d = _copy(world.utility, tmp_path / "rank")
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["r"] = 8
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    assert "do not belong together" in _err(ad.load_adapter, d)
    d = _copy(world.utility, tmp_path / "dora")
    cfg["r"], cfg["use_dora"] = 4, True
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    assert "use_dora" in _err(ad.load_adapter, d)
    assert "not a directory" in _err(ad.load_adapter, tmp_path / "nothing")


def test_nan_adapter_is_rejected(world, tmp_path):
    from safetensors.torch import load_file, save_file

    d = _copy(world.utility, tmp_path / "nan")
    t = load_file(d / "adapter_model.safetensors")
    k = sorted(t)[0]
    t[k][0, 0] = float("nan")
    save_file(t, str(d / "adapter_model.safetensors"))
    assert "NaN" in _err(ad.load_adapter, d)


def test_check_pair_catches_other_base_targets_and_ranks(world, tmp_path):
    U = ad.load_adapter(world.utility)
    other_base = make_base(tmp_path / "base48", hidden=48)
    other = ad.load_adapter(make_adapter(other_base, tmp_path / "o", targets=["q_proj", "v_proj", "down_proj"]))
    assert "different base models" in _err(ad.check_pair, U, ad.LoraAdapter(None, {}, other.layers))
    targets = ad.load_adapter(make_adapter(world.base, tmp_path / "t", targets=["q_proj", "k_proj"]))
    assert "different modules" in _err(ad.check_pair, U, targets)
    r2 = ad.load_adapter(make_adapter(world.base, tmp_path / "r2", r=2))
    ad.check_pair(U, r2)  # unequal ranks are fine unless a method needs them equal
    assert "equal ranks" in _err(ad.check_pair, U, r2, equal_ranks=True)
    named = ad.LoraAdapter(None, {"base_model_name_or_path": "org/other-model"}, U.layers)
    assert "same base model" in _err(ad.check_pair, ad.LoraAdapter(None, {"base_model_name_or_path": "org/model"}, U.layers), named)
    from sstmerge.merge.writers import ModelFiles

    assert "another base model" in _err(ad.check_against_base, U, ModelFiles(other_base).linear_shapes(), "b48", "utility")
