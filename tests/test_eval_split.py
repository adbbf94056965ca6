"""Evaluation on real hardware: vLLM's LoRA limits come from the adapters evaluated, and a model split
over devices (device_map) takes its inputs on the input embeddings' device (checked on CPU/meta)."""

from __future__ import annotations

import pytest
import torch

from sstmerge.errors import InputError
from sstmerge.eval.generate import model_device
from sstmerge.eval.vllm_backend import lora_limits
from test_merge_world import make_adapter, make_base


def test_vllm_lora_limits_cover_the_largest_rank(tmp_path):
    base = make_base(tmp_path / "base")
    r4 = make_adapter(base, tmp_path / "r4", r=4, seed=1)
    r20 = make_adapter(base, tmp_path / "r20", r=20, seed=2)  # a merge of two rank-10 adapters, say
    assert lora_limits([str(r4)]) == {"max_lora_rank": 8, "max_loras": 1}
    assert lora_limits([str(r4), str(r20)]) == {"max_lora_rank": 32, "max_loras": 1}
    assert lora_limits([]) == {}
    with pytest.raises(InputError):
        lora_limits([str(tmp_path / "missing")])


def test_inputs_go_to_the_input_embeddings_device():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1)
    m = LlamaForCausalLM(cfg)
    m.model.embed_tokens.to("meta")  # a later stage first in parameter order would be wrong too
    assert model_device(m).type == "meta"
    m2 = LlamaForCausalLM(cfg)
    m2.model.layers[1].to("meta")
    m2.lm_head.to("meta")
    assert model_device(m2) == torch.device("cpu")
