"""Triton kernel of diag_fisher_linear (see sstmerge.ops.diag_fisher_linear for the op)."""

import triton
import triton.language as tl


@triton.jit
def diag_fisher_linear_kernel(
    x_ptr, g_ptr, mask_ptr, out_ptr,
    B, T, I, O,
    x_stride_b, x_stride_t, x_stride_i,
    g_stride_b, g_stride_t, g_stride_o,
    mask_stride_b, mask_stride_t,
    out_stride_o, out_stride_i,
    HAS_MASK: tl.constexpr, NATIVE_DOT: tl.constexpr,
    BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """out[o, i] = sum_b G_b[o, i]^2,  G_b = sum_t mask[b, t] g[b, t, o] x[b, t, i]  (fp32).

    One program owns one [BLOCK_O, BLOCK_I] tile of out. For each sample b it accumulates that tile
    of G_b over token blocks with tl.dot (fp32, IEEE), then adds its square to the running Fisher
    tile; only one G_b tile exists at a time (memory O(O*I) for out plus a tile per program).
    NATIVE_DOT (GPU, bf16/fp16 inputs, a 0/1 mask): tiles stay 16-bit and tl.dot accumulates in
    fp32 on tensor cores (16-bit products are exact in fp32, so only the summation order differs);
    otherwise tiles are up-cast and the dot is fp32 IEEE (the interpreter needs this for bf16).
    Compute-bound: 2*B*T*O*I flops, like the full-batch weight-gradient GEMM; every program reads
    its x and g column panels once.
    """
    pid_o = tl.program_id(0)
    pid_i = tl.program_id(1)
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_t = tl.arange(0, BLOCK_T)
    in_o = offs_o < O
    in_i = offs_i < I

    fisher = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
    # per-sample base pointers advance by one stride per sample (no b * stride product that could
    # overflow 32 bits on large batches)
    x_b = x_ptr
    g_b = g_ptr
    mask_b = mask_ptr
    for b in range(0, B):
        grad = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
        for t0 in range(0, T, BLOCK_T):
            t = t0 + offs_t
            in_t = t < T
            g_tile = tl.load(
                g_b + t[:, None] * g_stride_t + offs_o[None, :] * g_stride_o,
                mask=in_t[:, None] & in_o[None, :], other=0.0,
            )  # [BLOCK_T, BLOCK_O]
            x_tile = tl.load(
                x_b + t[:, None] * x_stride_t + offs_i[None, :] * x_stride_i,
                mask=in_t[:, None] & in_i[None, :], other=0.0,
            )  # [BLOCK_T, BLOCK_I]
            if HAS_MASK:
                m = tl.load(mask_b + t * mask_stride_t, mask=in_t, other=0.0)
            if NATIVE_DOT:
                if HAS_MASK:
                    g_tile = tl.where(m[:, None] != 0, g_tile, tl.zeros_like(g_tile))
                grad += tl.dot(tl.trans(g_tile), x_tile, out_dtype=tl.float32)
            else:
                g_tile = g_tile.to(tl.float32)
                if HAS_MASK:
                    g_tile = g_tile * m[:, None]
                grad += tl.dot(tl.trans(g_tile), x_tile.to(tl.float32), input_precision="ieee")
        fisher += grad * grad
        x_b += x_stride_b
        g_b += g_stride_b
        mask_b += mask_stride_b

    tl.store(
        out_ptr + offs_o[:, None] * out_stride_o + offs_i[None, :] * out_stride_i,
        fisher, mask=in_o[:, None] & in_i[None, :],
    )
