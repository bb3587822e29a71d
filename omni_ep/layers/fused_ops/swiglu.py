"""The shared MLP's activation in one pass: [up | gate] -> up * silu(gate), as HunyuanImage-3.0 lays out its fused
gate_and_up_proj output (up FIRST, the activation on the second half).

Shape legend: T tokens, I intermediate size.

Eager torch runs two kernels, rounding where the kernel rounds:
    s   = (g32 / (1 + exp(-g32))).to(dtype)        F.silu, g32 = gate.float()
    out = (up.float() * s.float()).to(dtype)        the product
The kernel reads [up | gate] once and writes out once (two passes over [T, I] fewer).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from omni_ep.layers.fused_ops.backend import exp_f32, runs_triton


@triton.jit
def _swiglu_kernel(
    x_ptr,  # [T, 2I]: up, then gate
    out_ptr,  # [T, I]
    T,
    I,
    stride_x,
    stride_out,
    BLOCK_T: tl.constexpr,
    BLOCK_I: tl.constexpr,
):
    """BLOCK_T tokens x BLOCK_I columns per program."""
    rows = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    mask = (rows < T)[:, None] & (cols < I)[None, :]
    up_ptrs = x_ptr + rows[:, None] * stride_x + cols[None, :]
    up = tl.load(up_ptrs, mask=mask, other=0.0)
    gate = tl.load(up_ptrs + I, mask=mask, other=0.0).to(tl.float32)
    silu = tl.math.div_rn(gate, 1.0 + exp_f32(-gate)).to(up.dtype)
    out = up.to(tl.float32) * silu.to(tl.float32)
    tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


def swiglu(up_gate: torch.Tensor) -> torch.Tensor:
    """up_gate [..., 2I] -> up * silu(gate) [..., I] in up_gate's dtype (up: the first I columns)."""
    if up_gate.shape[-1] % 2:
        raise ValueError(f"swiglu takes [..., 2I] (up, then gate); the last dim is {up_gate.shape[-1]}")
    if not runs_triton(up_gate):
        up, gate = up_gate.chunk(2, dim=-1)
        return up * F.silu(gate)
    I = up_gate.shape[-1] // 2
    x = up_gate.reshape(-1, 2 * I)
    if x.stride(1) != 1:
        x = x.contiguous()
    out = torch.empty(x.shape[0], I, dtype=x.dtype, device=x.device)
    if out.numel():
        BLOCK_T, BLOCK_I = 4, min(1024, triton.next_power_of_2(I))
        _swiglu_kernel[(triton.cdiv(x.shape[0], BLOCK_T), triton.cdiv(I, BLOCK_I))](
            x, out, x.shape[0], I, x.stride(0), out.stride(0),
            BLOCK_T=BLOCK_T, BLOCK_I=BLOCK_I, num_warps=4, enable_fp_fusion=False,
        )
    return out.reshape(*up_gate.shape[:-1], I)
