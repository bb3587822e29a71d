"""RoPE then QK-norm, read straight from the fused qkv projection: one pass over q and k instead of split,
promote, rotate, normalise and cast as separate kernels.

Shape legend: B batch, S tokens, N query heads, N_kv KV heads, G = N / N_kv query heads per KV head, D head
dim. The qkv columns are grouped per KV head: for KV head g, [q_Gg .. q_Gg+G-1, k_g, v_g], D columns each.

What the model computes for q (and k, with the key weight), and where it rounds:
    r   = x32 * cos + rotate_half(x32) * sin                 fp32, x32 = q.float(); cos, sin fp32
    out = (weight * (r * rsqrt(mean(r^2) + eps))).to(dtype)  fp32 until the one cast to the model dtype
``HunyuanImage3RMSNorm`` gets an fp32 input here, so its "cast to x's dtype" is a no-op and the weight multiply
happens in fp32 (unlike the hidden-state norm in rms_norm.py). rotate_half pairs dim d with d + D/2:
out[:D/2] = x1*cos1 - x2*sin1, out[D/2:] = x2*cos2 + x1*sin2, the same roundings as x*cos + cat(-x2, x1)*sin.

Output layout: q [B, N, S, D] is a view of [B, S, N, D] memory, the layout the SDPA kernels write their output
in: the attention output then reaches o_proj without a transposing copy. k [B, N_kv, S, D] is contiguous, and v
the strided view of qkv that ``split_qkv`` returns (no copy, no rounding: v is neither rotated nor normalised);
or, given ``kv_out``, both are written into those tensors (the rows of a KV-cache step after the cached prefix,
which saves concatenating the prefix and the step's keys afterwards).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from omni_ep.layers.fused_ops.backend import rsqrt_f32, runs_triton


@triton.jit
def _rope_qk_norm_kernel(
    qkv_ptr,  # [B, S, N_kv * (G + 2) * D]
    cos_ptr,  # [S, D] or [B, S, D]
    sin_ptr,
    q_weight_ptr,  # [D]
    k_weight_ptr,  # [D]
    q_ptr,  # [B, N, S, D], strides (stride_q_b, stride_q_n, stride_q_s, 1)
    k_ptr,  # [B, N_kv, S, D], strides (stride_k_b, stride_k_n, stride_k_s, 1)
    v_ptr,  # [B, N_kv, S, D], strides of k; written only when COPY_V
    S,
    num_kv_heads,
    stride_qkv_b,
    stride_qkv_s,
    stride_cos_b,
    stride_cos_s,
    stride_q_b,
    stride_q_n,
    stride_q_s,
    stride_k_b,
    stride_k_n,
    stride_k_s,
    eps,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    COPY_V: tl.constexpr,
):
    """One program per (batch row, block of BLOCK_S tokens, KV head): its G query heads and its key head.
    The KV head varies fastest across programs, so the N_kv programs that share a cos/sin tile run together
    and read it from L2."""
    HALF: tl.constexpr = HEAD_DIM // 2
    pid = tl.program_id(0)
    g = pid % num_kv_heads
    block = pid // num_kv_heads
    num_s_blocks = tl.cdiv(S, BLOCK_S)
    b = (block // num_s_blocks).to(tl.int64)
    s = ((block % num_s_blocks) * BLOCK_S + tl.arange(0, BLOCK_S)).to(tl.int64)
    d = tl.arange(0, BLOCK_HALF)
    d_ok = d < HALF
    mask = (s < S)[:, None] & d_ok[None, :]

    cos_row = cos_ptr + b * stride_cos_b + s[:, None] * stride_cos_s + d[None, :]
    sin_row = sin_ptr + b * stride_cos_b + s[:, None] * stride_cos_s + d[None, :]
    cos1 = tl.load(cos_row, mask=mask, other=0.0).to(tl.float32)
    cos2 = tl.load(cos_row + HALF, mask=mask, other=0.0).to(tl.float32)
    sin1 = tl.load(sin_row, mask=mask, other=0.0).to(tl.float32)
    sin2 = tl.load(sin_row + HALF, mask=mask, other=0.0).to(tl.float32)
    q_w1 = tl.load(q_weight_ptr + d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    q_w2 = tl.load(q_weight_ptr + HALF + d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    k_w1 = tl.load(k_weight_ptr + d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    k_w2 = tl.load(k_weight_ptr + HALF + d, mask=d_ok, other=0.0).to(tl.float32)[None, :]

    group_row = qkv_ptr + b * stride_qkv_b + s[:, None] * stride_qkv_s + g * ((GROUP + 2) * HEAD_DIM) + d[None, :]
    for i in tl.static_range(GROUP + 1):  # the group's query heads, then its key head
        x1 = tl.load(group_row + i * HEAD_DIM, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(group_row + i * HEAD_DIM + HALF, mask=mask, other=0.0).to(tl.float32)
        r1 = x1 * cos1 - x2 * sin1
        r2 = x2 * cos2 + x1 * sin2
        mean_square = tl.math.div_rn(tl.sum(r1 * r1, axis=1) + tl.sum(r2 * r2, axis=1), HEAD_DIM * 1.0)
        inv_rms = rsqrt_f32(mean_square + eps)[:, None]
        if i < GROUP:
            w1 = q_w1
            w2 = q_w2
            out_row = q_ptr + b * stride_q_b + (g * GROUP + i) * stride_q_n + s[:, None] * stride_q_s + d[None, :]
        else:
            w1 = k_w1
            w2 = k_w2
            out_row = k_ptr + b * stride_k_b + g * stride_k_n + s[:, None] * stride_k_s + d[None, :]
        tl.store(out_row, (w1 * (r1 * inv_rms)).to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(out_row + HALF, (w2 * (r2 * inv_rms)).to(q_ptr.dtype.element_ty), mask=mask)
    if COPY_V:
        v_row = v_ptr + b * stride_k_b + g * stride_k_n + s[:, None] * stride_k_s + d[None, :]
        v1 = tl.load(group_row + (GROUP + 1) * HEAD_DIM, mask=mask, other=0.0)
        v2 = tl.load(group_row + (GROUP + 1) * HEAD_DIM + HALF, mask=mask, other=0.0)
        tl.store(v_row, v1, mask=mask)
        tl.store(v_row + HALF, v2, mask=mask)


def _norm_torch(r: torch.Tensor, weight: torch.Tensor, eps: float, dtype: torch.dtype) -> torch.Tensor:
    """r [..., D] fp32 -> (weight * r / rms(r)).to(dtype), the weight multiply in fp32."""
    r = r * torch.rsqrt(r.pow(2).mean(-1, keepdim=True) + eps)
    return (weight * r).to(dtype)


def _rope_torch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, S, D], cos/sin [B, 1, S, D] -> fp32 x*cos + rotate_half(x)*sin."""
    x = x.float()
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def rope_qk_norm(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    eps: float,
    num_kv_heads: int,
    group_size: int,
    head_dim: int,
    kv_out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """qkv [B, S, N_kv * (G + 2) * D] (model dtype), cos/sin [S, D] or [B, S, D] fp32, q_weight/k_weight [D]
    -> q [B, N, S, D] (a view of [B, S, N, D] memory), k [B, N_kv, S, D] contiguous in qkv's dtype,
    v [B, N_kv, S, D] a view of qkv; or k and v written into ``kv_out`` (two [B, N_kv, S, D] tensors of qkv's
    dtype, last dim contiguous, one stride pattern) and returned."""
    B, S, width = qkv.shape
    N_kv, G, D = num_kv_heads, group_size, head_dim
    if width != N_kv * (G + 2) * D:
        raise ValueError(f"qkv width {width} != num_kv_heads * (group_size + 2) * head_dim = {N_kv * (G + 2) * D}")
    if D % 2:
        raise ValueError(f"RoPE pairs the two halves of the head dim: head_dim {D} must be even")
    if cos.shape != sin.shape or cos.shape not in ((S, D), (B, S, D)):
        raise ValueError(f"cos {tuple(cos.shape)}, sin {tuple(sin.shape)}: want both [S={S}, D={D}] or [B={B}, S, D]")
    if q_weight.shape != (D,) or k_weight.shape != (D,):
        raise ValueError(f"q_weight {tuple(q_weight.shape)} and k_weight {tuple(k_weight.shape)} must be [D={D}]")
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    if kv_out is not None:
        k_out, v_out = kv_out
        want = (B, N_kv, S, D)
        if k_out.shape != want or v_out.shape != want or k_out.stride() != v_out.stride() or k_out.stride(-1) != 1 \
                or k_out.dtype != qkv.dtype or v_out.dtype != qkv.dtype:
            raise ValueError(f"kv_out must be two {list(want)} tensors of {qkv.dtype} with one stride pattern, last "
                             f"dim contiguous; got {tuple(k_out.shape)} {k_out.stride()} {k_out.dtype} and "
                             f"{tuple(v_out.shape)} {v_out.stride()} {v_out.dtype}")
    qkv_BSKJD = qkv.view(B, S, N_kv, G + 2, D)  # J: the G query heads, k, v of one KV head
    v = qkv_BSKJD[:, :, :, G + 1].transpose(1, 2)
    if not runs_triton(qkv):
        cos4, sin4 = (t.float().reshape(-1, 1, S, D) for t in (cos, sin))
        q = qkv_BSKJD[:, :, :, :G].reshape(B, S, N_kv * G, D).transpose(1, 2)
        q = _norm_torch(_rope_torch(q, cos4, sin4), q_weight, eps, qkv.dtype).transpose(1, 2).contiguous()
        k = _norm_torch(_rope_torch(qkv_BSKJD[:, :, :, G].transpose(1, 2), cos4, sin4), k_weight, eps, qkv.dtype)
        if kv_out is None:
            return q.transpose(1, 2), k.contiguous(), v
        kv_out[0].copy_(k)
        kv_out[1].copy_(v)
        return q.transpose(1, 2), kv_out[0], kv_out[1]

    cos, sin = cos.contiguous(), sin.contiguous()
    q = torch.empty(B, S, N_kv * G, D, dtype=qkv.dtype, device=qkv.device).transpose(1, 2)
    k_out, v_out = kv_out if kv_out is not None else (torch.empty(B, N_kv, S, D, dtype=qkv.dtype, device=qkv.device), v)
    if q.numel():
        BLOCK_HALF = triton.next_power_of_2(D // 2)
        BLOCK_S = max(1, min(triton.next_power_of_2(S), 1024 // BLOCK_HALF))
        num_warps = min(8, max(1, BLOCK_S * BLOCK_HALF // 128))  # 4 elements of a half-head tile per thread
        _rope_qk_norm_kernel[(B * triton.cdiv(S, BLOCK_S) * N_kv,)](
            qkv, cos, sin, q_weight.contiguous(), k_weight.contiguous(), q, k_out, v_out,
            S, N_kv, qkv.stride(0), qkv.stride(1), cos.stride(0) if cos.dim() == 3 else 0, cos.stride(-2),
            *q.stride()[:3], *k_out.stride()[:3], eps,
            GROUP=G, HEAD_DIM=D, BLOCK_S=BLOCK_S, BLOCK_HALF=BLOCK_HALF, COPY_V=kv_out is not None,
            num_warps=num_warps, enable_fp_fusion=False,
        )
    return q, k_out, v_out
