"""Per-row FP8 quantization of the expert GEMMs' activations: x before gate_up, h before down (see fp8.py).

x_q[r, :] = x[r, :] / scale[r] in e4m3fn, scale[r] = max(max|x[r, :]| / 448, 1e-12): the same roundings as
``fp8.quantize_rows`` (IEEE division, round to nearest even), so both give the same bits. One program per row.
The rounding to e4m3's grid is done in fp32 arithmetic, so the conversion itself is exact: Triton's interpreter
converts to fp8 without carrying a rounding into the exponent (31.6 became 16).

Shape legend: R rows, D columns.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from omni_ep.layers.fused_moe.fp8 import FP8_DTYPE, FP8_MAX, MIN_SCALE


@triton.jit
def _round_to_e4m3(v):
    """fp32 v (|v| <= 448) rounded to the nearest e4m3fn value, ties to even, still in fp32: adding then
    subtracting 1.5 * 2^23 ulp rounds to a multiple of ulp, the spacing of e4m3 values near v (3 mantissa bits,
    2^-9 below the smallest normal 2^-6)."""
    a = tl.abs(v)
    exponent = ((a.to(tl.uint32, bitcast=True) >> 23) & 0xFF).to(tl.int32) - 127
    ulp_exponent = tl.maximum(exponent, -6) - 3
    magic = (((ulp_exponent + 23 + 127) << 23) | (1 << 22)).to(tl.uint32).to(tl.float32, bitcast=True)
    r = (a + magic) - magic
    return tl.where(v < 0, -r, r)


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, scale_ptr, num_rows_ptr, D, stride_xm, stride_qm,
                          FP8_MAX: tl.constexpr, MIN_SCALE: tl.constexpr, BLOCK_D: tl.constexpr,
                          HAS_NUM_ROWS: tl.constexpr, SWIGLU: tl.constexpr):
    row = tl.program_id(0)
    if HAS_NUM_ROWS:
        if row >= tl.load(num_rows_ptr):
            return
    cols = tl.arange(0, BLOCK_D)
    x_row = x_ptr + row.to(tl.int64) * stride_xm
    if SWIGLU:  # x holds [gate | up], D columns each; h = silu(gate) * up, rounded to x's dtype first
        gate = tl.load(x_row + cols, mask=cols < D, other=0.0).to(tl.float32)
        up = tl.load(x_row + D + cols, mask=cols < D, other=0.0).to(tl.float32)
        x = (gate * tl.sigmoid(gate) * up).to(x_ptr.dtype.element_ty).to(tl.float32)
    else:
        x = tl.load(x_row + cols, mask=cols < D, other=0.0).to(tl.float32)
    scale = tl.maximum(tl.div_rn(tl.max(tl.abs(x), axis=0), FP8_MAX), MIN_SCALE)
    q = _round_to_e4m3(tl.clamp(tl.div_rn(x, scale), -FP8_MAX, FP8_MAX))
    tl.store(q_ptr + row.to(tl.int64) * stride_qm + cols, q.to(q_ptr.dtype.element_ty), mask=cols < D)
    tl.store(scale_ptr + row, scale)


def quantize_rows_fp8(x_RD: torch.Tensor, num_rows: torch.Tensor | None = None,
                      swiglu: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x [R, D] -> (x_q [R, D] e4m3fn, scale [R] fp32). num_rows: a one-element device tensor; rows from it on
    are left unwritten (the padded tail of the expert-sorted layout), read from the device, no host sync.
    swiglu: x is [R, 2D], gate then up columns, and silu(gate) * up (in x's dtype, as a GEMM would store it) is
    what gets quantized."""
    R, D = x_RD.shape[0], x_RD.shape[1] // 2 if swiglu else x_RD.shape[1]
    x_q = torch.empty(R, D, dtype=FP8_DTYPE, device=x_RD.device)
    scale = torch.empty(R, dtype=torch.float32, device=x_RD.device)
    if R == 0:
        return x_q, scale
    block_d = triton.next_power_of_2(D)
    _quantize_rows_kernel[(R,)](
        x_RD, x_q, scale, num_rows, D, x_RD.stride(0), x_q.stride(0), FP8_MAX=FP8_MAX, MIN_SCALE=MIN_SCALE,
        BLOCK_D=block_d, HAS_NUM_ROWS=num_rows is not None, SWIGLU=swiglu, num_warps=8 if block_d >= 2048 else 4,
    )
    return x_q, scale
