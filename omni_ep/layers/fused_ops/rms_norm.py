"""RMSNorm of HunyuanImage-3.0 in one pass, optionally fused with the residual add before it.

Shape legend: N rows (tokens), C channels (hidden size).

The model's norm (``HunyuanImage3RMSNorm``) rounds twice, and the kernel rounds at the same places:
    xn  = (x32 * rsqrt(mean(x32^2) + eps)).to(x.dtype)      x32 = x.float()
    out = weight * xn                                        in promote(weight, x) dtype: bf16 * bf16 -> bf16
The weight multiply comes AFTER the cast to x's dtype (one more rounding than normalising in fp32 throughout).
``add_rms_norm`` first forms h = x + residual in the model dtype (rounded once, as eager torch adds) and
normalises h: the decoder layer's ``h = x + attn`` then ``post_attention_layernorm(h)``, and the next layer's
``y = h + moe`` then ``input_layernorm(y)``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from omni_ep.layers.fused_ops.backend import rsqrt_f32, runs_triton

MAX_CHANNELS = 65536  # one row is one register tile


@triton.jit
def _rms_norm_kernel(
    x_ptr,  # [N, C]
    residual_ptr,  # [N, C], read only with HAS_RESIDUAL
    weight_ptr,  # [C]
    h_ptr,  # [N, C] x + residual, written only with HAS_RESIDUAL
    out_ptr,  # [N, C]
    N,
    C,
    stride_x,
    stride_residual,
    stride_h,
    stride_out,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """A block of BLOCK_N whole rows per program: read once, reduce in fp32, write once."""
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    col_ok = cols < C
    mask = (rows < N)[:, None] & col_ok[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + rows[:, None] * stride_residual + cols[None, :], mask=mask, other=0.0)
        x = (x.to(tl.float32) + residual.to(tl.float32)).to(h_ptr.dtype.element_ty)
        tl.store(h_ptr + rows[:, None] * stride_h + cols[None, :], x, mask=mask)
    x32 = x.to(tl.float32)
    mean_square = tl.math.div_rn(tl.sum(x32 * x32, axis=1), C * 1.0)
    xn = (x32 * rsqrt_f32(mean_square + eps)[:, None]).to(x.dtype)
    weight = tl.load(weight_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    out = weight[None, :] * xn.to(tl.float32)
    tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[..., C] -> [N, C] with unit column stride (a view where possible)."""
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def _launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float):
    """(h or None, out), both [..., C] like x."""
    C = x.shape[-1]
    if C > MAX_CHANNELS:
        raise ValueError(f"rms_norm keeps a row in registers: C={C} exceeds {MAX_CHANNELS}")
    x_NC = _rows(x)
    res_NC = None if residual is None else _rows(residual)
    h_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    h_NC = None if residual is None else torch.empty(x_NC.shape, dtype=h_dtype, device=x.device)
    out_NC = torch.empty(x_NC.shape, dtype=torch.promote_types(weight.dtype, h_dtype), device=x.device)
    N = x_NC.shape[0]
    if N:
        BLOCK_C = triton.next_power_of_2(C)
        BLOCK_N = max(1, min(16, 4096 // BLOCK_C))
        num_warps = min(max(BLOCK_N * BLOCK_C // 512, 1), 16)
        has_residual = residual is not None
        _rms_norm_kernel[(triton.cdiv(N, BLOCK_N),)](
            x_NC, res_NC if has_residual else x_NC, weight.contiguous(), h_NC if has_residual else out_NC, out_NC,
            N, C, x_NC.stride(0), res_NC.stride(0) if has_residual else 0, h_NC.stride(0) if has_residual else 0,
            out_NC.stride(0), eps,
            HAS_RESIDUAL=has_residual, BLOCK_N=BLOCK_N, BLOCK_C=BLOCK_C, num_warps=num_warps, enable_fp_fusion=False,
        )
    out = out_NC.view(x.shape)
    return (None if h_NC is None else h_NC.view(x.shape)), out


def _check_weight(x: torch.Tensor, weight: torch.Tensor) -> None:
    if weight.shape != x.shape[-1:]:
        raise ValueError(f"weight {tuple(weight.shape)} must be [C={x.shape[-1]}] for x {tuple(x.shape)}")


def _rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., C] (bf16 / fp16 / fp32), weight [C] -> [..., C] in promote(weight, x) dtype (x's dtype in the
    model): normalised in fp32, cast to x's dtype, then times weight."""
    _check_weight(x, weight)
    if not runs_triton(x):
        return _rms_norm_torch(x, weight, eps)
    return _launch(x, None, weight, eps)[1]


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual [..., C], weight [C] -> (h = x + residual [..., C] in promote(x, residual) dtype,
    rms_norm(h, weight, eps))."""
    if x.shape != residual.shape:
        raise ValueError(f"x {tuple(x.shape)} and residual {tuple(residual.shape)} must have the same shape")
    _check_weight(x, weight)
    if not runs_triton(x):
        h = x + residual
        return h, _rms_norm_torch(h, weight, eps)
    return _launch(x, residual, weight, eps)
