"""sstmerge CUDA kernels (csrc/cuda). Tensors cross as data pointers (ints), strides (in elements)
and dtype codes (0 = float32, 1 = bfloat16, 2 = float16); ``device`` is the GPU index and
``stream`` torch's current stream (``torch.cuda.current_stream(device).cuda_stream``). Outputs are
fp32 and must be allocated by the caller. A refused or failed launch raises RuntimeError.
See python/sstmerge/ops/_cuda.py for how the ops are built from these three kernels."""

from collections.abc import Sequence

def diag_fisher_linear(
    x: int,
    x_strides: Sequence[int],
    g: int,
    g_strides: Sequence[int],
    dtype: int,
    mask: int,
    mask_strides: Sequence[int],
    B: int,
    T: int,
    I: int,
    O: int,
    out: int,
    device: int,
    stream: int,
) -> None:
    """out[O, I] (fp32, contiguous) = sum_b G_b * G_b, G_b = sum_t mask[b,t] g[b,t]^T x[b,t];
    x [B, T, I], g [B, T, O] (strides of 3), mask fp32 [B, T] (strides of 2) or 0 for none."""

def gram(
    a: int,
    a_dtype: int,
    a_strides: Sequence[int],
    b: int,
    b_dtype: int,
    b_strides: Sequence[int],
    w: int,
    w_strides: Sequence[int],
    batch: int,
    rows: int,
    M: int,
    L: int,
    rows_per_split: int,
    splits: int,
    symmetric: bool,
    out: int,
    device: int,
    stream: int,
) -> None:
    """out[n*splits + s] (fp32 [M, L] each, contiguous) = sum over the rows r of split s
    ([s*rows_per_split, (s+1)*rows_per_split) clipped to rows) of w[n, r] a[n, r, :]^T b[n, r, :].
    Strides are (batch, row, col) for a and b and (batch, row) for w (fp32, or 0 for none).
    symmetric (a is b, M == L): only tiles on or above the diagonal are computed, then mirrored."""

def lora_merge_(
    w: int,
    w_dtype: int,
    w_strides: Sequence[int],
    b: int,
    b_strides: Sequence[int],
    a: int,
    a_strides: Sequence[int],
    ab_dtype: int,
    O: int,
    I: int,
    K: int,
    scale: float,
    device: int,
    stream: int,
) -> None:
    """In place w[O, I] <- round(w + scale * b[O, K] @ a[K, I]): product in fp32, one rounding."""

def built_archs() -> str:
    """GPU architectures compiled in (nvcc's __CUDA_ARCH_LIST__, e.g. '800,900')."""
