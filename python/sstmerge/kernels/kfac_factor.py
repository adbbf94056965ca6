"""Triton kernels of kfac_factor and kfac_sketch (see sstmerge.ops.kfac_factor for the ops).

    kfac_factor(x, mask)        = gram(x, x)                       [I, I]
    kfac_factor(x, mask, q)     = gram(y, y),     y = project(x, q)      [m, m]
    kfac_sketch(x, omega, mask) = gram(x, y),     y = project(x, omega)  [I, l]

with gram(a, b)[i, j] = sum_n mask_n a[n, i] b[n, j]. The projection y ([N, m] fp32) is computed
once by project_kernel rather than inside every output tile of gram: for the sketch of a wide
layer, recomputing x @ omega per [BLOCK_M] row tile of the output would cost I / BLOCK_M times
the flops.
"""

import triton
import triton.language as tl


@triton.jit
def project_kernel(
    x_ptr, q_ptr, y_ptr,
    N, K, L,
    x_stride_n, x_stride_k,
    q_stride_k, q_stride_l,
    y_stride_n, y_stride_l,
    BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """y[n, l] = sum_k x[n, k] q[k, l]  (fp32 out, fp32 accumulation).

    One program per [BLOCK_N, BLOCK_L] tile of y. Memory-bound when L is small (the usual case:
    2*N*K*L flops for N*K loaded elements of x); compute-bound as L grows past ~64.
    """
    pid_n = tl.program_id(0)
    pid_l = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_k = tl.arange(0, BLOCK_K)
    in_n = offs_n < N
    in_l = offs_l < L
    rows = offs_n.to(tl.int64)
    acc = tl.zeros((BLOCK_N, BLOCK_L), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        in_k = k < K
        x_tile = tl.load(
            x_ptr + rows[:, None] * x_stride_n + k[None, :] * x_stride_k,
            mask=in_n[:, None] & in_k[None, :], other=0.0,
        ).to(tl.float32)
        q_tile = tl.load(
            q_ptr + k[:, None] * q_stride_k + offs_l[None, :] * q_stride_l,
            mask=in_k[:, None] & in_l[None, :], other=0.0,
        ).to(tl.float32)
        acc += tl.dot(x_tile, q_tile, input_precision="ieee")
    tl.store(
        y_ptr + rows[:, None] * y_stride_n + offs_l[None, :] * y_stride_l,
        acc, mask=in_n[:, None] & in_l[None, :],
    )


@triton.jit
def masked_gram_kernel(
    a_ptr, b_ptr, mask_ptr, out_ptr,
    N, M, L, ROWS_PER_SPLIT,
    a_stride_n, a_stride_m,
    b_stride_n, b_stride_l,
    mask_stride_n,
    out_stride_s, out_stride_m, out_stride_l,
    HAS_MASK: tl.constexpr, SYMMETRIC: tl.constexpr, NATIVE_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """out[s, i, j] = sum_{n in split s} mask_n a[n, i] b[n, j]  (fp32).

    Program (pid_m, pid_l, s) owns one [BLOCK_M, BLOCK_L] output tile and the rows
    [s * ROWS_PER_SPLIT, (s + 1) * ROWS_PER_SPLIT) of a and b; the caller sums the splits (a fixed
    order, so results are deterministic). With SYMMETRIC (a is b, BLOCK_M == BLOCK_L) only tiles
    on or above the diagonal are computed and each off-diagonal tile is also stored transposed.
    Compute-bound for wide outputs (2*N*M*L flops, the A^T A GEMM); memory-bound when L is small.
    NATIVE_DOT (GPU, a and b both bf16 or both fp16, a 0/1 mask): 16-bit tiles, fp32-accumulating
    tensor-core dots; otherwise fp32 tiles and IEEE dots.
    """
    pid_m = tl.program_id(0)
    pid_l = tl.program_id(1)
    split = tl.program_id(2)
    if SYMMETRIC:
        if pid_l < pid_m:
            return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_n = tl.arange(0, BLOCK_N)
    in_m = offs_m < M
    in_l = offs_l < L
    n_begin = split * ROWS_PER_SPLIT
    n_end = tl.minimum(n_begin + ROWS_PER_SPLIT, N)

    acc = tl.zeros((BLOCK_M, BLOCK_L), dtype=tl.float32)
    for n0 in range(n_begin, n_end, BLOCK_N):
        n = n0 + offs_n
        in_n = n < n_end
        rows = n.to(tl.int64)
        a_tile = tl.load(
            a_ptr + rows[:, None] * a_stride_n + offs_m[None, :] * a_stride_m,
            mask=in_n[:, None] & in_m[None, :], other=0.0,
        )  # [BLOCK_N, BLOCK_M]
        b_tile = tl.load(
            b_ptr + rows[:, None] * b_stride_n + offs_l[None, :] * b_stride_l,
            mask=in_n[:, None] & in_l[None, :], other=0.0,
        )  # [BLOCK_N, BLOCK_L]
        if HAS_MASK:
            w = tl.load(mask_ptr + rows * mask_stride_n, mask=in_n, other=0.0)
        if NATIVE_DOT:
            if HAS_MASK:
                a_tile = tl.where(w[:, None] != 0, a_tile, tl.zeros_like(a_tile))
            acc += tl.dot(tl.trans(a_tile), b_tile, out_dtype=tl.float32)
        else:
            a_tile = a_tile.to(tl.float32)
            if HAS_MASK:
                a_tile = a_tile * w[:, None]
            acc += tl.dot(tl.trans(a_tile), b_tile.to(tl.float32), input_precision="ieee")

    out_s = out_ptr + split.to(tl.int64) * out_stride_s
    in_tile = in_m[:, None] & in_l[None, :]
    tl.store(
        out_s + offs_m[:, None] * out_stride_m + offs_l[None, :] * out_stride_l, acc, mask=in_tile
    )
    if SYMMETRIC:
        if pid_l > pid_m:  # the mirrored tile: out[j, i] = out[i, j]
            tl.store(
                out_s + offs_l[None, :] * out_stride_m + offs_m[:, None] * out_stride_l,
                acc, mask=in_tile,
            )
