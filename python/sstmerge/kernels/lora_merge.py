"""Triton kernel of lora_merge_ (see sstmerge.ops.lora_merge for the op)."""

import triton
import triton.language as tl


@triton.jit
def _round_to_bf16(v):
    """fp32 -> bf16, round to nearest even (torch's rounding); NaN stays a quiet NaN.

    Done on the bits because the interpreter's bf16 cast does not round like torch; on a GPU it
    compiles to a few integer ops and gives the same bits as the hardware conversion.
    """
    u = v.to(tl.uint32, bitcast=True)
    r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    r = tl.where(v != v, (u >> 16) | 0x40, r)
    return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def lora_merge_kernel(
    w_ptr, b_ptr, a_ptr,
    O, I, K, scale,
    w_stride_o, w_stride_i,
    b_stride_o, b_stride_k,
    a_stride_k, a_stride_i,
    W_BF16: tl.constexpr,
    BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """In place w[o, i] <- round(w[o, i] + scale * sum_k b[o, k] a[k, i]), the sum in fp32.

    One program per [BLOCK_O, BLOCK_I] tile of w: the rank-K product tile is accumulated in fp32
    registers, added to the fp32 value of w and rounded once to w's dtype; no [O, I] temporary.
    Memory-bound: one read and one write of w (2*O*I*K flops, K ~ 16, against 2*O*I elements moved).
    """
    pid_o = tl.program_id(0)
    pid_i = tl.program_id(1)
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_k = tl.arange(0, BLOCK_K)
    in_o = offs_o < O
    in_i = offs_i < I

    acc = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        in_k = k < K
        b_tile = tl.load(
            b_ptr + offs_o[:, None] * b_stride_o + k[None, :] * b_stride_k,
            mask=in_o[:, None] & in_k[None, :], other=0.0,
        ).to(tl.float32)
        a_tile = tl.load(
            a_ptr + k[:, None] * a_stride_k + offs_i[None, :] * a_stride_i,
            mask=in_k[:, None] & in_i[None, :], other=0.0,
        ).to(tl.float32)
        acc += tl.dot(b_tile, a_tile, input_precision="ieee")

    w_ptrs = w_ptr + offs_o[:, None].to(tl.int64) * w_stride_o + offs_i[None, :] * w_stride_i
    in_tile = in_o[:, None] & in_i[None, :]
    merged = tl.load(w_ptrs, mask=in_tile, other=0.0).to(tl.float32) + scale * acc
    if W_BF16:
        tl.store(w_ptrs, _round_to_bf16(merged), mask=in_tile)
    else:
        tl.store(w_ptrs, merged.to(w_ptr.dtype.element_ty), mask=in_tile)
