"""GEMM 1 of the local experts: gather the tokens, multiply by each expert's gate and up rows, SwiGLU.

h[r, :] = silu(x[t] @ w13[e, :I].T) * (x[t] @ w13[e, I:].T) for row r of the expert-sorted layout,
t = sorted_pair[r] // K its token and e its block's expert. With ONE_DOT the gate and up weight rows are
loaded interleaved into one tile, so each K step is one MMA twice as wide. Persistent: a program per SM loops
over the tiles, whose number it reads from the device (no host sync).

Shape legend: M tokens, H hidden, I intermediate, E local experts, R padded sorted rows (see align.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from omni_ep.layers.fused_moe.experts.triton_kernels.align import BlockAlignment
from omni_ep.layers.fused_moe.experts.triton_kernels.gemm_tiles import grouped_tile, load_k_step, persistent_programs


@triton.jit
def _gate_up_swiglu_kernel(
    x_ptr, w13_ptr, h_ptr,
    sorted_pair_ptr, block_expert_ptr, num_padded_ptr,
    num_pairs, top_k, H, I,
    stride_xm, stride_we, stride_wn, stride_hm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr, ONE_DOT: tl.constexpr,
):
    num_m_blocks = tl.load(num_padded_ptr) // BLOCK_M
    num_n_blocks = tl.cdiv(I, BLOCK_N)
    for tile in range(tl.program_id(0), num_m_blocks * num_n_blocks, tl.num_programs(0)):
        m_block, n_block = grouped_tile(tile, num_m_blocks, num_n_blocks, GROUP_M)
        expert = tl.load(block_expert_ptr + m_block).to(tl.int64)
        rows = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
        pair = tl.load(sorted_pair_ptr + rows)
        # Padding rows read token 0; GEMM 2 never stores them.
        token = tl.where(pair < num_pairs, pair // top_k, 0).to(tl.int64)
        cols = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + token[:, None] * stride_xm + ks[None, :]
        w_base = w13_ptr + expert * stride_we + ks[:, None]
        if ONE_DOT:
            # One [BLOCK_K, 2*BLOCK_N] weight tile, gate and up rows interleaved: a single wide MMA per step.
            j = tl.arange(0, 2 * BLOCK_N)
            w_rows = (j % 2) * I + (n_block * BLOCK_N + j // 2) % I
            gate_up_ptrs = w_base + w_rows[None, :] * stride_wn
            acc = tl.zeros((BLOCK_M, 2 * BLOCK_N), dtype=tl.float32)
            for k in range(0, tl.cdiv(H, BLOCK_K)):
                a = load_k_step(x_ptrs, ks, H - k * BLOCK_K, EVEN_K, 1)
                b = load_k_step(gate_up_ptrs, ks, H - k * BLOCK_K, EVEN_K, 0)
                acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
                x_ptrs += BLOCK_K
                gate_up_ptrs += BLOCK_K
            acc_gate, acc_up = tl.split(tl.reshape(acc, (BLOCK_M, BLOCK_N, 2)))
        else:
            w_cols = cols % I  # wrap instead of masking the weight loads; wrapped columns are not stored
            gate_ptrs = w_base + w_cols[None, :] * stride_wn
            up_ptrs = gate_ptrs + I * stride_wn
            acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k in range(0, tl.cdiv(H, BLOCK_K)):
                a = load_k_step(x_ptrs, ks, H - k * BLOCK_K, EVEN_K, 1)
                g = load_k_step(gate_ptrs, ks, H - k * BLOCK_K, EVEN_K, 0)
                u = load_k_step(up_ptrs, ks, H - k * BLOCK_K, EVEN_K, 0)
                acc_gate = tl.dot(a, g, acc_gate, input_precision=DOT_PRECISION)
                acc_up = tl.dot(a, u, acc_up, input_precision=DOT_PRECISION)
                x_ptrs += BLOCK_K
                gate_ptrs += BLOCK_K
                up_ptrs += BLOCK_K
        h = acc_gate * tl.sigmoid(acc_gate) * acc_up
        h_ptrs = h_ptr + rows[:, None].to(tl.int64) * stride_hm + cols[None, :]
        tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=cols[None, :] < I)


def gate_up_swiglu(
    x_MH: torch.Tensor, w13_E2IH: torch.Tensor, align: BlockAlignment, top_k: int, config: dict, num_sms: int
) -> torch.Tensor:
    """x [M, H], w13 [E, 2I, H] (gate rows, then up rows) -> h [R, I] in the expert-sorted row layout."""
    H = x_MH.shape[1]
    I = w13_E2IH.shape[1] // 2
    h_RI = torch.empty(align.sorted_pair_R.numel(), I, dtype=x_MH.dtype, device=x_MH.device)
    programs = persistent_programs(align.block_expert_B.numel(), triton.cdiv(I, config["BLOCK_N"]), config, num_sms)
    _gate_up_swiglu_kernel[(programs,)](
        x_MH, w13_E2IH, h_RI,
        align.sorted_pair_R, align.block_expert_B, align.num_padded_rows,
        align.num_pairs, top_k, H, I,
        x_MH.stride(0), w13_E2IH.stride(0), w13_E2IH.stride(1), h_RI.stride(0),
        BLOCK_M=align.block_m, BLOCK_N=config["BLOCK_N"], BLOCK_K=config["BLOCK_K"], GROUP_M=config["GROUP_M"],
        EVEN_K=H % config["BLOCK_K"] == 0, DOT_PRECISION="ieee" if x_MH.dtype == torch.float32 else "tf32",
        ONE_DOT=config.get("ONE_DOT", False),
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )
    return h_RI
