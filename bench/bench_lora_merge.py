"""lora_merge_: cpp vs the torch reference vs peft's LoraLayer merge, against a plain copy of w (the
memory-bound limit: one read and one write of w).

Full mode: DESIGN.md section 8, w 4096x4096, r=16, fp32 and bf16; target cpp <= 1.5x the copy.
The kernels merge into the same w round after round (its values drift; the work does not change).
"""

from __future__ import annotations

import os

import pytest
import torch

import sstmerge.ops as ops
from _timing import assert_agree, check_target, run

CANDIDATES = ["copy_limit", "cpp", "cpp_no_amx", "torch_reference", "peft_merge"]


def make(name, O, I, r, dtype):
    gen = torch.Generator().manual_seed(0)
    w = (0.02 * torch.randn(O, I, generator=gen)).to(dtype)
    b = (0.02 * torch.randn(O, r, generator=gen)).to(dtype)
    a = (0.02 * torch.randn(r, I, generator=gen)).to(dtype)
    if name == "copy_limit":
        w2 = torch.empty_like(w)
        return lambda: w2.copy_(w), None
    if name in ("cpp", "torch_reference"):
        bk = "cpp" if name == "cpp" else "torch"
        want = (w.double() + 2.0 * (b.double() @ a.double())).to(dtype)
        assert_agree(name, ops.lora_merge_(w.clone(), b, a, 2.0, backend=bk), want, rtol=1e-2)
        return lambda: ops.lora_merge_(w, b, a, 2.0, backend=bk), None
    if name == "cpp_no_amx":  # the FMA path, for bf16 where the AMX tile path would run
        if dtype != torch.bfloat16:
            pytest.skip("the AMX path is bf16 only")

        def no_amx():
            before = os.environ.get("SSTMERGE_AMX")
            os.environ["SSTMERGE_AMX"] = "0"
            try:
                return ops.lora_merge_(w, b, a, 2.0, backend="cpp")
            finally:
                if before is None:
                    del os.environ["SSTMERGE_AMX"]
                else:
                    os.environ["SSTMERGE_AMX"] = before

        want = (w.double() + 2.0 * (b.double() @ a.double())).to(dtype)
        w0 = w.clone()
        assert_agree(name, no_amx(), want, rtol=1e-2)
        w.copy_(w0)
        return no_amx, None
    if name == "peft_merge":
        peft = pytest.importorskip("peft")
        model = torch.nn.Sequential(torch.nn.Linear(I, O, bias=False))
        model = peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0"]))
        model = model.to(dtype)
        layer = model.base_model.model[0]
        with torch.no_grad():
            layer.base_layer.weight.copy_(w)
            layer.lora_A["default"].weight.copy_(a)
            layer.lora_B["default"].weight.copy_(b)

        def setup():
            layer.merged_adapters.clear()  # merge again into the already merged weight

        def f():
            with torch.no_grad():
                layer.merge()
            return layer.base_layer.weight

        want = (w.double() + 2.0 * (b.double() @ a.double())).to(dtype)
        assert_agree(name, f(), want, rtol=1e-2)  # scaling alpha / r = 2, as the kernels
        return f, setup
    raise KeyError(name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", CANDIDATES)
def bench_lora_merge(benchmark, mode, name, dtype):
    O, I, r = (4096, 4096, 16) if mode.full else (1024, 1024, 16)
    fn, setup = make(name, O, I, r, dtype)  # each candidate is checked there before it is timed
    role = {"copy_limit": "limit", "cpp": "cpp", "cpp_no_amx": "cpp", "torch_reference": "reference"}.get(name, "peer")
    run(benchmark, fn, mode, group=f"lora_merge_ {O}x{I} r{r} {str(dtype)[6:]}", role=role,
        setup=setup, dtype=dtype, shape=(O, I, r))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def bench_lora_merge_target(mode, dtype):
    """DESIGN.md section 8: cpp <= 1.5x a copy of w, fp32 and bf16 (asserted in full mode)."""
    O, I, r = (4096, 4096, 16) if mode.full else (1024, 1024, 16)
    check_target(mode, f"lora_merge_ cpp {str(dtype)[6:]}", make("cpp", O, I, r, dtype)[0],
                 make("copy_limit", O, I, r, dtype)[0], 1.5)
