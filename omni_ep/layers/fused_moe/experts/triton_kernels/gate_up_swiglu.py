"""GEMM 1 of the local experts: gather the tokens, multiply by each expert's gate and up rows, SwiGLU.

h[r, :] = silu(x[t] @ w13[e, :I].T) * (x[t] @ w13[e, I:].T) for row r of the expert-sorted layout,
t = sorted_pair[r] // K its token and e its block's expert. Persistent: a program per SM loops over the tiles,
whose number it reads from the device (no host sync). The x rows are gathered by pointer in both kernels here;
the weights, by config.kernel:
  pointer  gate and up tiles read by pointer (cp.async), two MMAs per K step: any GPU, the interpreter;
  tma      one [2, BLOCK_N, BLOCK_K] copy-engine read of the gate rows, then the up rows, through a [2E, I, H]
           descriptor: a single MMA twice as wide per K step (Hopper and later);
  gluon    gate_up_swiglu_gluon.py on Hopper: x first copied into expert-sorted rows (gather_sorted_rows), all
           loads by TMA from a loader warp; the same wide tile, the same result bit for bit as tma.

Shape legend: M tokens, H hidden, I intermediate, E local experts, R padded sorted rows (see align.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from omni_ep.layers.fused_moe.experts.triton_configs import GemmConfig
from omni_ep.layers.fused_moe.experts.triton_kernels.align import BlockAlignment
from omni_ep.layers.fused_moe.experts.triton_kernels.gemm_tiles import (
    fp8_accumulation,
    gluon_module,
    grouped_tile,
    load_k_step,
    persistent_programs,
    tma_descriptor,
    tma_fits,
)


@triton.jit
def _gather_sorted_rows_kernel(x_ptr, x_sorted_ptr, scale_ptr, scale_sorted_ptr, sorted_pair_ptr, num_padded_ptr,
                               num_pairs, top_k, H, stride_xm, stride_sm, ROWS: tl.constexpr, BLOCK_H: tl.constexpr,
                               HAS_SCALE: tl.constexpr):
    """x_sorted[r, cols] = x[sorted_pair[r] // K, cols] for ROWS rows and BLOCK_H columns (and scale_sorted[r] =
    scale[that token]); padding rows are not written (their GEMM rows are never stored)."""
    row0 = tl.program_id(0) * ROWS
    num_padded = tl.load(num_padded_ptr)
    if row0 >= num_padded:
        return
    rows = row0 + tl.arange(0, ROWS)
    pair = tl.load(sorted_pair_ptr + rows, mask=rows < num_padded, other=num_pairs)
    token = (pair // top_k).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = (pair < num_pairs)[:, None] & (cols < H)[None, :]
    v = tl.load(x_ptr + token[:, None] * stride_xm + cols[None, :], mask=mask)
    tl.store(x_sorted_ptr + rows[:, None].to(tl.int64) * stride_sm + cols[None, :], v, mask=mask)
    if HAS_SCALE:
        if tl.program_id(1) == 0:
            is_pair = pair < num_pairs
            tl.store(scale_sorted_ptr + rows, tl.load(scale_ptr + token, mask=is_pair), mask=is_pair)


@triton.jit
def _gate_up_tile(
    x_ptr, w13_ptr, w_desc, h_ptr, sorted_pair_ptr, x_scale_ptr, w_scale_ptr,
    expert, row0, n_block, num_pairs, top_k, H, I,
    stride_xm, stride_we, stride_wn, stride_hm, stride_se,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr, TMA: tl.constexpr, SCALED: tl.constexpr,
    FP8_ACC: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_N] tile of h: sorted rows row0.. of expert `expert`, columns of n_block."""
    rows = row0 + tl.arange(0, BLOCK_M)
    cols = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    pair = tl.load(sorted_pair_ptr + rows)
    # Padding rows read token 0; GEMM 2 never stores them.
    token = tl.where(pair < num_pairs, pair // top_k, 0).to(tl.int64)
    x_ptrs = x_ptr + token[:, None] * stride_xm + ks[None, :]
    if TMA:
        # w_desc views w13 as [2E, I, H]: one [2, BLOCK_N, BLOCK_K] read holds the gate rows, then the up
        # rows (zeros past I), a single MMA twice as wide per K step.
        acc = tl.zeros((BLOCK_M, 2 * BLOCK_N), dtype=tl.float32)
        for k in range(0, tl.cdiv(H, BLOCK_K)):
            a = load_k_step(x_ptrs + k * BLOCK_K, ks, H - k * BLOCK_K, EVEN_K, 1)
            b = w_desc.load([(2 * expert).to(tl.int32), n_block * BLOCK_N, k * BLOCK_K])
            acc = tl.dot(a, tl.reshape(b, (2 * BLOCK_N, BLOCK_K)).T, acc, input_precision=DOT_PRECISION,
                         max_num_imprecise_acc=FP8_ACC)
        acc_gate, acc_up = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N)), (0, 2, 1)))
    else:
        w_cols = cols % I  # wrap instead of masking the weight loads; wrapped columns are not stored
        gate_ptrs = w13_ptr + expert * stride_we + ks[:, None] + w_cols[None, :] * stride_wn
        up_ptrs = gate_ptrs + I * stride_wn
        acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, tl.cdiv(H, BLOCK_K)):
            a = load_k_step(x_ptrs, ks, H - k * BLOCK_K, EVEN_K, 1)
            g = load_k_step(gate_ptrs, ks, H - k * BLOCK_K, EVEN_K, 0)
            u = load_k_step(up_ptrs, ks, H - k * BLOCK_K, EVEN_K, 0)
            acc_gate = tl.dot(a, g, acc_gate, input_precision=DOT_PRECISION, max_num_imprecise_acc=FP8_ACC)
            acc_up = tl.dot(a, u, acc_up, input_precision=DOT_PRECISION, max_num_imprecise_acc=FP8_ACC)
            x_ptrs += BLOCK_K
            gate_ptrs += BLOCK_K
            up_ptrs += BLOCK_K
    if SCALED:  # FP8 operands: x row scales times the gate / up weight rows' scales
        x_scale = tl.load(x_scale_ptr + token)[:, None]
        w_scales = w_scale_ptr + expert * stride_se + cols % I
        acc_gate = acc_gate * x_scale * tl.load(w_scales)[None, :]
        acc_up = acc_up * x_scale * tl.load(w_scales + I)[None, :]
    h = (acc_gate * tl.sigmoid(acc_gate) * acc_up).to(h_ptr.dtype.element_ty)
    h_ptrs = h_ptr + rows[:, None].to(tl.int64) * stride_hm + cols[None, :]
    tl.store(h_ptrs, h, mask=cols[None, :] < I)


@triton.jit
def _gate_up_swiglu_kernel(
    x_ptr, w13_ptr, w_desc, h_ptr,
    sorted_pair_ptr, block_expert_ptr, num_padded_ptr, x_scale_ptr, w_scale_ptr,
    num_pairs, top_k, H, I,
    stride_xm, stride_we, stride_wn, stride_hm, stride_se,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr, TMA: tl.constexpr, SCALED: tl.constexpr,
    FP8_ACC: tl.constexpr,
):
    num_m_blocks = tl.load(num_padded_ptr) // BLOCK_M
    num_n_blocks = tl.cdiv(I, BLOCK_N)
    for tile in range(tl.program_id(0), num_m_blocks * num_n_blocks, tl.num_programs(0)):
        m_block, n_block = grouped_tile(tile, num_m_blocks, num_n_blocks, GROUP_M)
        expert = tl.load(block_expert_ptr + m_block).to(tl.int64)
        _gate_up_tile(x_ptr, w13_ptr, w_desc, h_ptr, sorted_pair_ptr, x_scale_ptr, w_scale_ptr,
                      expert, m_block * BLOCK_M, n_block, num_pairs, top_k, H, I,
                      stride_xm, stride_we, stride_wn, stride_hm, stride_se,
                      BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, DOT_PRECISION, TMA, SCALED, FP8_ACC)


def gather_sorted_rows(x_MH: torch.Tensor, align: BlockAlignment, top_k: int,
                       scale_M: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x [M, H] -> (x_sorted [R, H], scale_sorted [R] or None): row r holds its pair's token (and that token's
    scale, where the FP8 tokens' scales [M] are given); padding rows and rows past num_padded_rows stay unwritten.
    The Gluon gate_up and the FP8 grouped GEMM read their A tiles from it. Small programs (16 rows x 512 columns):
    the copy runs near HBM write bandwidth."""
    R, H = align.sorted_pair_R.numel(), x_MH.shape[1]
    x_RH = torch.empty(R, H, dtype=x_MH.dtype, device=x_MH.device)
    scale_R = None if scale_M is None else torch.empty(R, dtype=scale_M.dtype, device=x_MH.device)
    rows, block_h = 16, min(512, triton.next_power_of_2(H))
    _gather_sorted_rows_kernel[(triton.cdiv(R, rows), triton.cdiv(H, block_h))](
        x_MH, x_RH, scale_M, scale_R, align.sorted_pair_R, align.num_padded_rows, align.num_pairs, top_k, H,
        x_MH.stride(0), x_RH.stride(0), ROWS=rows, BLOCK_H=block_h, HAS_SCALE=scale_M is not None,
    )
    return x_RH, scale_R


def gate_up_kernel(x_MH: torch.Tensor, w13_E2IH: torch.Tensor, block_m: int, config: GemmConfig) -> str:
    """The kernel gate_up_swiglu runs: config.kernel where it can run these tensors and tiles, else the next
    one down (gluon -> tma -> pointer; see gluon_gate_up_fits and tma_fits)."""
    if config.kernel == "gluon" and x_MH.is_cuda and x_MH.element_size() > 1:
        gluon = gluon_module("gate_up_swiglu_gluon")
        if gluon is not None and gluon.gluon_gate_up_fits(x_MH, w13_E2IH, block_m, config):
            return "gluon"
    if config.kernel in ("gluon", "tma") and w13_E2IH.is_contiguous() and tma_fits(w13_E2IH):
        return "tma"
    return "pointer"


def gate_up_swiglu(
    x_MH: torch.Tensor, w13_E2IH: torch.Tensor, align: BlockAlignment, top_k: int, config: GemmConfig, num_sms: int,
    x_scale_M: torch.Tensor | None = None, w13_scale_E2I: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """x [M, H], w13 [E, 2I, H] (gate rows, then up rows) -> h [R, I] in the expert-sorted row layout, in
    out_dtype (default x's). FP8 operands (fp8.py) come with their scales: x_scale [M], w13_scale [E, 2I]."""
    E, two_I, H = w13_E2IH.shape
    I = two_I // 2
    block_m = align.block_m
    programs = persistent_programs(align.block_expert_B.numel(), triton.cdiv(I, config.block_n), config, num_sms)
    kernel = gate_up_kernel(x_MH, w13_E2IH, block_m, config)
    if kernel == "gluon":
        return gluon_module("gate_up_swiglu_gluon").gate_up_swiglu_gluon(x_MH, w13_E2IH, align, top_k, config,
                                                                         programs)
    h_RI = torch.empty(align.sorted_pair_R.numel(), I, dtype=out_dtype or x_MH.dtype, device=x_MH.device)
    scaled = x_scale_M is not None
    tma = kernel == "tma"
    w_desc = tma_descriptor(w13_E2IH.view(2 * E, I, H), 2, config.block_n, config.block_k) if tma else None
    _gate_up_swiglu_kernel[(programs,)](
        x_MH, w13_E2IH, w_desc, h_RI,
        align.sorted_pair_R, align.block_expert_B, align.num_padded_rows, x_scale_M, w13_scale_E2I,
        align.num_pairs, top_k, H, I,
        x_MH.stride(0), w13_E2IH.stride(0), w13_E2IH.stride(1), h_RI.stride(0),
        w13_scale_E2I.stride(0) if scaled else 0,
        BLOCK_M=block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, GROUP_M=config.group_m,
        EVEN_K=H % config.block_k == 0, DOT_PRECISION="ieee" if x_MH.dtype == torch.float32 else "tf32", TMA=tma,
        SCALED=scaled, FP8_ACC=fp8_accumulation(x_MH, config.block_k),
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return h_RI
