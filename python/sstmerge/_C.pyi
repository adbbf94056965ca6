"""Stub of the compiled C++ CPU module ``sstmerge._C`` (csrc/cpu/bindings.cpp).

Tensors cross as ``TensorSpec = (data_ptr, dtype code, sizes, strides)``: dtype codes 0 = float32,
1 = bfloat16, 2 = float16; sizes and strides in elements (any strides; views are not copied).
Outputs are caller-allocated contiguous float32 buffers passed by address. ``mask`` is the address
of a contiguous float32 mask ([B, T] or [N]) or 0 for none. ``nthreads`` OpenMP threads; ``isa``
picks a kernel variant for this call ("" = :func:`isa`). Every function releases the GIL and raises
ValueError for a variant that is not built or that this CPU cannot run. Call them through
:mod:`sstmerge.ops._cpp`, which builds the specs and outputs.
"""

from typing import Optional

TensorSpec = tuple[int, int, list[int], list[int]]

def isa() -> str:
    """The variant the kernels run with: SSTMERGE_ISA if set (read once), else the best built one
    this CPU runs ("avx512", "avx2" or "generic")."""

def built_isas() -> list[str]:
    """The variants compiled into this module."""

def runnable_isas() -> list[str]:
    """The built variants this CPU can run."""

def build_info() -> dict[str, bool]:
    """{"cuda_requested": SSTMERGE_CUDA was not OFF, "cuda_built": a CUDA compiler was found and
    sstmerge._C_cuda was built}."""

def diag_fisher_linear(
    out: int, x: TensorSpec, g: TensorSpec, mask: int, nthreads: int, isa: str = ""
) -> None:
    """out[O, I] (zeroed) += sum_b G_b * G_b, G_b = sum_t mask[b,t] g[b,t]^T x[b,t]; x [B,T,I],
    g [B,T,O]."""

def subspace_grads(
    out: int,
    x: TensorSpec,
    g: TensorSpec,
    q_in: TensorSpec,
    q_out: TensorSpec,
    mask: int,
    nthreads: int,
    isa: str = "",
) -> None:
    """out[B, m_o, m_i] = sum_t mask[b,t] (q_out^T g[b,t]) (q_in^T x[b,t])^T."""

def kfac_factor(
    out: int, x: TensorSpec, mask: int, q: Optional[TensorSpec], nthreads: int, isa: str = ""
) -> None:
    """out[d, d] = sum_n mask[n] y_n y_n^T, y_n = x_n or q^T x_n; x [N, I], q [I, m]."""

def kfac_sketch(
    out: int, x: TensorSpec, omega: TensorSpec, mask: int, nthreads: int, isa: str = ""
) -> None:
    """out[I, l] = sum_n mask[n] x_n (x_n^T omega); x [N, I], omega [I, l]."""

def lora_merge_(
    w: TensorSpec, b: TensorSpec, a: TensorSpec, scale: float, nthreads: int, isa: str = ""
) -> None:
    """In place w[O, I] <- round(w + scale * b @ a): fp32 product and sum, one rounding."""
