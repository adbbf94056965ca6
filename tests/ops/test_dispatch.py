"""ops.backends.dispatch: plain eager calls run the op body directly, everything else goes through
the registered torch custom op (fake tensors, torch.compile), and both give the same result.
(torch.compile of the registered ops themselves is opcheck's part, in each op's tests.)"""

from __future__ import annotations

import sys

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import sstmerge.ops as ops
from sstmerge.ops.backends import _plain_eager, dispatch


def _calls(monkeypatch):
    """Count the calls that go through the registered custom ops."""
    seen = []

    def spy(op, impl, *args, **kw):
        if not _plain_eager(a for a in args if isinstance(a, torch.Tensor)):
            seen.append(str(op))
        return dispatch(op, impl, *args, **kw)

    for mod in ("diag_fisher_linear", "lora_merge"):
        monkeypatch.setattr(sys.modules[f"sstmerge.ops.{mod}"], "dispatch", spy)
    return seen


def test_fake_tensors_go_through_the_custom_op(monkeypatch):
    seen = _calls(monkeypatch)
    with FakeTensorMode():
        x, g = torch.empty(2, 5, 7), torch.empty(2, 5, 3)
        out = ops.diag_fisher_linear(x, g, backend="cpp")
    assert out.shape == (3, 7) and out.dtype == torch.float32
    assert len(seen) == 1


def test_eager_and_custom_op_agree_and_mutation_bumps_the_version():
    gen = torch.Generator().manual_seed(0)
    x, g = torch.randn(3, 9, 11, generator=gen), torch.randn(3, 9, 4, generator=gen)
    direct = ops.diag_fisher_linear(x, g, backend="cpp")
    via_op = torch.ops.sstmerge.diag_fisher_linear(x, g, None, "cpp")
    assert torch.equal(direct, via_op)
    w = torch.randn(4, 6, generator=gen).bfloat16()
    b, a = torch.randn(4, 2, generator=gen).bfloat16(), torch.randn(2, 6, generator=gen).bfloat16()
    w2 = w.clone()
    v = w._version
    ops.lora_merge_(w, b, a, 0.5, backend="cpp")
    assert w._version > v  # autograd sees the in-place write, as through the custom op
    torch.ops.sstmerge.lora_merge_(w2, b, a, 0.5, "cpp")
    assert torch.equal(w, w2)
