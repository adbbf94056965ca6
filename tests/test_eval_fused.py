"""sstmerge.eval.fused: an adapter fused into the weights computes what the peft wrapper computes
(to round-off), the original weights come back bit for bit, and a mismatched adapter is refused."""

from __future__ import annotations

import pytest
import torch

from sstmerge import worlds
from sstmerge.errors import InputError
from sstmerge.eval.fused import FusedAdapters
from sstmerge.models import load_model


@pytest.fixture(scope="module")
def tiny():
    return worlds.ensure("tiny", progress=False)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_fused_equals_the_peft_wrapper_and_restores_exactly(tiny):
    from peft import PeftModel

    model, tok = load_model(tiny.base_model)
    model.eval()
    ids = torch.tensor([tok("the capital of france is paris", add_special_tokens=False)["input_ids"]])
    before = _state(model)
    with torch.no_grad(), FusedAdapters(model) as fuse:
        for adapter in (tiny.utility_adapter, tiny.safety_adapter):  # one after the other: no accumulation
            with fuse(adapter):
                fused = model(input_ids=ids).logits
            assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
            wrapped = PeftModel.from_pretrained(model, adapter).eval()
            peft = wrapped(input_ids=ids).logits
            model = wrapped.unload()
            # the two differ by fp32 round-off of x (W0 + s B A) vs x W0 + s (x A^T) B^T, accumulated
            # over the layers: a few hundred eps of the logits' scale
            tol = 512 * torch.finfo(torch.float32).eps * float(peft.abs().max())
            assert float((fused - peft).abs().max()) <= tol
            assert float((fused - model(input_ids=ids).logits).abs().max()) > tol  # the adapter did act
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_an_adapter_for_another_model_is_refused_and_nothing_changes(tiny, tmp_path):
    from sstmerge import adapters as ad

    model, _ = load_model(tiny.base_model)
    before = _state(model)
    U = ad.load_adapter(tiny.utility_adapter)
    name = sorted(U.layers)[0]
    L = U.layers[name]
    (tmp_path / "bad").mkdir()
    ad.save_adapter(tmp_path / "bad", {name: (torch.zeros(L.B.shape[0] + 1, L.rank), L.A, L.scale)})
    with FusedAdapters(model) as fuse:
        with pytest.raises(InputError, match="the model's weight"):
            with fuse(tmp_path / "bad"):
                pass
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
