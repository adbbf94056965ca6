"""Triton kernel of subspace_grads (see sstmerge.ops.subspace_grads for the op)."""

import triton
import triton.language as tl


@triton.jit
def subspace_grads_kernel(
    x_ptr, g_ptr, q_in_ptr, q_out_ptr, mask_ptr, out_ptr,
    T, I, O, M_IN, M_OUT,
    x_stride_b, x_stride_t, x_stride_i,
    g_stride_b, g_stride_t, g_stride_o,
    q_in_stride_i, q_in_stride_m,
    q_out_stride_o, q_out_stride_m,
    mask_stride_b, mask_stride_t,
    out_stride_b, out_stride_mo, out_stride_mi,
    HAS_MASK: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_MO: tl.constexpr, BLOCK_MI: tl.constexpr,
):
    """out[b] = sum_t mask[b, t] (q_out^T g[b, t]) (q_in^T x[b, t])^T   ([M_OUT, M_IN], fp32).

    One program owns sample b and one [BLOCK_MO, BLOCK_MI] tile of out[b] (usually all of it: the
    subspace dims are <= 2r). Per token block it projects first, pg = g_t @ q_out and
    px = x_t @ q_in (loops over O and I), then adds pg^T px; G_b [O, I] never exists.
    Memory-bound for small subspaces: it streams x and g once (2*T*(I*M_IN + O*M_OUT) flops per
    sample against T*(I + O) loaded elements); q_in and q_out tiles are re-read from cache.
    """
    b = tl.program_id(0).to(tl.int64)
    pid_mo = tl.program_id(1)
    pid_mi = tl.program_id(2)
    offs_mo = pid_mo * BLOCK_MO + tl.arange(0, BLOCK_MO)
    offs_mi = pid_mi * BLOCK_MI + tl.arange(0, BLOCK_MI)
    offs_t = tl.arange(0, BLOCK_T)
    offs_k = tl.arange(0, BLOCK_K)
    in_mo = offs_mo < M_OUT
    in_mi = offs_mi < M_IN
    x_b = x_ptr + b * x_stride_b
    g_b = g_ptr + b * g_stride_b

    acc = tl.zeros((BLOCK_MO, BLOCK_MI), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + offs_t
        in_t = t < T
        pg = tl.zeros((BLOCK_T, BLOCK_MO), dtype=tl.float32)
        for k0 in range(0, O, BLOCK_K):
            k = k0 + offs_k
            in_k = k < O
            g_tile = tl.load(
                g_b + t[:, None] * g_stride_t + k[None, :] * g_stride_o,
                mask=in_t[:, None] & in_k[None, :], other=0.0,
            ).to(tl.float32)
            q_tile = tl.load(
                q_out_ptr + k[:, None] * q_out_stride_o + offs_mo[None, :] * q_out_stride_m,
                mask=in_k[:, None] & in_mo[None, :], other=0.0,
            ).to(tl.float32)
            pg += tl.dot(g_tile, q_tile, input_precision="ieee")
        px = tl.zeros((BLOCK_T, BLOCK_MI), dtype=tl.float32)
        for k0 in range(0, I, BLOCK_K):
            k = k0 + offs_k
            in_k = k < I
            x_tile = tl.load(
                x_b + t[:, None] * x_stride_t + k[None, :] * x_stride_i,
                mask=in_t[:, None] & in_k[None, :], other=0.0,
            ).to(tl.float32)
            q_tile = tl.load(
                q_in_ptr + k[:, None] * q_in_stride_i + offs_mi[None, :] * q_in_stride_m,
                mask=in_k[:, None] & in_mi[None, :], other=0.0,
            ).to(tl.float32)
            px += tl.dot(x_tile, q_tile, input_precision="ieee")
        if HAS_MASK:
            m = tl.load(mask_ptr + b * mask_stride_b + t * mask_stride_t, mask=in_t, other=0.0)
            pg = pg * m[:, None]
        acc += tl.dot(tl.trans(pg), px, input_precision="ieee")

    out_b = out_ptr + b * out_stride_b
    tl.store(
        out_b + offs_mo[:, None] * out_stride_mo + offs_mi[None, :] * out_stride_mi,
        acc, mask=in_mo[:, None] & in_mi[None, :],
    )
