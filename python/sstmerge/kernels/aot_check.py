"""Compile every Triton kernel of sstmerge for GPUs, without a GPU.

    python -m sstmerge.kernels.aot_check            # sm_80 and sm_90
    python -m sstmerge.kernels.aot_check 80 90 100

The interpreter (``TRITON_INTERPRET=1``) runs the kernels' logic on the CPU but compiles nothing,
so code that only the GPU compiler rejects would pass the CPU tests. This compiles each kernel,
in every constexpr branch and input dtype family the glue (sstmerge.ops._triton) launches, down
to a cubin with Triton's bundled ptxas. Run it without ``TRITON_INTERPRET=1`` (a test whose
session sets it runs this in a subprocess with ``TRITON_INTERPRET=0``). It uses Triton's
compiler API (``ASTSource``, ``GPUTarget``), so a Triton release that changes that API makes it
fail loudly, not pass.
"""

from __future__ import annotations

import os
import sys
import time

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from .diag_fisher_linear import diag_fisher_linear_kernel
from .kfac_factor import masked_gram_kernel, project_kernel
from .lora_merge import lora_merge_kernel
from .subspace_grads import subspace_grads_kernel

ARCHS = (80, 90)

# (kernel, types of its non-int arguments, constexprs): every branch the glue can launch
F32, BF16, FP16 = "*fp32", "*bf16", "*fp16"
CASES = [
    (diag_fisher_linear_kernel,
     {"x_ptr": BF16, "g_ptr": BF16, "mask_ptr": F32, "out_ptr": F32},
     dict(HAS_MASK=True, NATIVE_DOT=True, BLOCK_O=64, BLOCK_I=64, BLOCK_T=32)),
    (diag_fisher_linear_kernel,
     {"x_ptr": FP16, "g_ptr": FP16, "mask_ptr": F32, "out_ptr": F32},
     dict(HAS_MASK=False, NATIVE_DOT=True, BLOCK_O=64, BLOCK_I=64, BLOCK_T=32)),
    (diag_fisher_linear_kernel,
     {"x_ptr": F32, "g_ptr": F32, "mask_ptr": F32, "out_ptr": F32},
     dict(HAS_MASK=True, NATIVE_DOT=False, BLOCK_O=64, BLOCK_I=64, BLOCK_T=32)),
    (subspace_grads_kernel,
     {"x_ptr": BF16, "g_ptr": BF16, "q_in_ptr": F32, "q_out_ptr": F32, "mask_ptr": F32,
      "out_ptr": F32},
     dict(HAS_MASK=True, BLOCK_T=32, BLOCK_K=64, BLOCK_MO=32, BLOCK_MI=16)),
    (project_kernel,
     {"x_ptr": BF16, "q_ptr": F32, "y_ptr": F32},
     dict(BLOCK_N=32, BLOCK_L=64, BLOCK_K=64)),
    (masked_gram_kernel,
     {"a_ptr": BF16, "b_ptr": BF16, "mask_ptr": F32, "out_ptr": F32},
     dict(HAS_MASK=True, SYMMETRIC=True, NATIVE_DOT=True, BLOCK_M=64, BLOCK_L=64, BLOCK_N=32)),
    (masked_gram_kernel,
     {"a_ptr": FP16, "b_ptr": F32, "mask_ptr": F32, "out_ptr": F32},
     dict(HAS_MASK=True, SYMMETRIC=False, NATIVE_DOT=False, BLOCK_M=64, BLOCK_L=16, BLOCK_N=32)),
    (lora_merge_kernel,
     {"w_ptr": BF16, "b_ptr": BF16, "a_ptr": BF16, "scale": "fp32"},
     dict(W_BF16=True, BLOCK_O=64, BLOCK_I=64, BLOCK_K=16)),
    (lora_merge_kernel,
     {"w_ptr": FP16, "b_ptr": F32, "a_ptr": F32, "scale": "fp32"},
     dict(W_BF16=False, BLOCK_O=64, BLOCK_I=64, BLOCK_K=32)),
]


def _source(fn, types: dict, consts: dict) -> ASTSource:
    names = fn.arg_names
    signature = {n: "constexpr" if n in consts else types.get(n, "i32") for n in names}
    constexprs = {(names.index(k),): v for k, v in consts.items()}
    return ASTSource(fn=fn, signature=signature, constexprs=constexprs)


def compile_all(archs=ARCHS, verbose: bool = False) -> list[str]:
    """Compile every case for every arch; returns "<kernel> sm_<arch>" for each; raises on a
    failure."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError(
            "aot_check compiles the kernels; run it with TRITON_INTERPRET unset or 0 "
            "(under the interpreter the kernels are interpreted functions, which do not compile)"
        )
    done = []
    for arch in archs:
        for fn, types, consts in CASES:
            t0 = time.perf_counter()
            kernel = triton.compile(_source(fn, types, consts), target=GPUTarget("cuda", arch, 32))
            if "cubin" not in kernel.asm:
                raise RuntimeError(f"{fn.__name__}: no cubin for sm_{arch}")
            done.append(f"{fn.__name__} sm_{arch}")
            if verbose:
                print(f"ok  {fn.__name__:28s} sm_{arch}  {time.perf_counter() - t0:.1f}s")
    return done


if __name__ == "__main__":
    archs = tuple(int(a) for a in sys.argv[1:]) or ARCHS
    n = len(compile_all(archs, verbose=True))
    print(f"{n} kernel compilations for sm_{', sm_'.join(map(str, archs))}: all ok")
