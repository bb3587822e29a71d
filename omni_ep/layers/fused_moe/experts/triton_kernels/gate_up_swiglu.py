"""GEMM 1 of the local experts: gather the tokens, multiply by each expert's gate and up rows, SwiGLU.

h[r, :] = silu(x[t] @ w13[e, :I].T) * (x[t] @ w13[e, I:].T) for row r of the expert-sorted layout,
t = sorted_pair[r] // K its token and e its block's expert. Persistent: a program per SM loops over the tiles,
whose number it reads from the device (no host sync). Operand loads, by config flag:
  default   x rows gathered and weight tiles read by pointer (cp.async);
  ONE_DOT   the gate and up weight rows loaded into one tile: one MMA twice as wide per K step;
  TMA       weight tiles read by the copy engine through a tensor descriptor (Hopper and later);
  SORTED_X  (with TMA) x first copied into expert-sorted rows [R, H] (padding rows left unwritten: their
            h rows are never stored), so its tiles are TMA reads too;
  WARP_SPECIALIZE  (with SORTED_X) Triton's automatic warp specialisation of the K loop;
  HALF_TILES  (not with SORTED_X) a row block whose second half is all padding is a BLOCK_M/2 tile;
  FLATTEN   (not with HALF_TILES) the tile loop and the K loop flattened into one software pipeline, so the
            next tile's first operand loads are in flight during this tile's epilogue;
  TMA_STORE (with TMA, not with HALF_TILES) h tiles written by the copy engine through a tensor descriptor;
  GLUON     on Hopper, gate_up_swiglu_gluon.py's kernel instead: x copied into expert-sorted rows as with
            SORTED_X, ONE_DOT tiles, all loads by TMA from a loader warp of its own, h by TMA stores.

Shape legend: M tokens, H hidden, I intermediate, E local experts, R padded sorted rows (see align.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from omni_ep.layers.fused_moe.experts.triton_kernels.align import BlockAlignment
from omni_ep.layers.fused_moe.experts.triton_kernels.gemm_tiles import (
    gluon_module,
    grouped_tile,
    load_k_step,
    persistent_programs,
    pointer_k_loop,
    tma_descriptor,
    tma_fits,
)


@triton.jit
def _gather_sorted_rows_kernel(x_ptr, x_sorted_ptr, sorted_pair_ptr, num_padded_ptr, num_pairs, top_k, H,
                               stride_xm, stride_sm, ROWS: tl.constexpr, BLOCK_H: tl.constexpr):
    """x_sorted[r, cols] = x[sorted_pair[r] // K, cols] for ROWS rows and BLOCK_H columns; padding rows are not
    written (their GEMM rows are never stored)."""
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


@triton.jit
def _a_tile(x_ptrs, x_desc, row0, k, ks, k_left, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
            SORTED_X: tl.constexpr):
    """K step k of the [BLOCK_M, BLOCK_K] activation tile: a TMA read of sorted rows, or a pointer gather."""
    if SORTED_X:
        a = x_desc.load([row0, k * BLOCK_K])
    else:
        a = load_k_step(x_ptrs + k * BLOCK_K, ks, k_left, EVEN_K, 1)
    return a


@triton.jit
def _gate_up_tile(
    x_ptr, x_desc, w13_ptr, w_desc, h_ptr, h_desc, sorted_pair_ptr,
    expert, row0, n_block, num_pairs, top_k, H, I,
    stride_xm, stride_we, stride_wn, stride_hm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr, ONE_DOT: tl.constexpr, TMA: tl.constexpr,
    SORTED_X: tl.constexpr, WARP_SPECIALIZE: tl.constexpr, TMA_STORE: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_N] tile of h: sorted rows row0.. of expert `expert`, columns of n_block."""
    rows = row0 + tl.arange(0, BLOCK_M)
    cols = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    if SORTED_X:
        x_ptrs = x_ptr
    else:
        pair = tl.load(sorted_pair_ptr + rows)
        # Padding rows read token 0; GEMM 2 never stores them.
        token = tl.where(pair < num_pairs, pair // top_k, 0).to(tl.int64)
        x_ptrs = x_ptr + token[:, None] * stride_xm + ks[None, :]
    if TMA and ONE_DOT:
        # w_desc views w13 as [2E, I, H]: one [2, BLOCK_N, BLOCK_K] read holds the gate rows, then the up
        # rows (zeros past I), a single MMA twice as wide per K step.
        acc = tl.zeros((BLOCK_M, 2 * BLOCK_N), dtype=tl.float32)
        for k in tl.range(0, tl.cdiv(H, BLOCK_K), warp_specialize=WARP_SPECIALIZE):
            a = _a_tile(x_ptrs, x_desc, row0, k, ks, H - k * BLOCK_K, BLOCK_K, EVEN_K, SORTED_X)
            b = w_desc.load([(2 * expert).to(tl.int32), n_block * BLOCK_N, k * BLOCK_K])
            acc = tl.dot(a, tl.reshape(b, (2 * BLOCK_N, BLOCK_K)).T, acc, input_precision=DOT_PRECISION)
        acc_gate, acc_up = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N)), (0, 2, 1)))
    elif TMA:
        # Rows of the [E*2I, H] weight view; a last partial N block reads neighbouring rows (or zeros past
        # the end), and its columns are not stored.
        gate_row = (expert * 2 * I).to(tl.int32) + n_block * BLOCK_N
        acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in tl.range(0, tl.cdiv(H, BLOCK_K), warp_specialize=WARP_SPECIALIZE):
            a = _a_tile(x_ptrs, x_desc, row0, k, ks, H - k * BLOCK_K, BLOCK_K, EVEN_K, SORTED_X)
            g = w_desc.load([gate_row, k * BLOCK_K])
            u = w_desc.load([gate_row + I, k * BLOCK_K])
            acc_gate = tl.dot(a, g.T, acc_gate, input_precision=DOT_PRECISION)
            acc_up = tl.dot(a, u.T, acc_up, input_precision=DOT_PRECISION)
    elif ONE_DOT:
        # One [BLOCK_K, 2*BLOCK_N] weight tile, gate and up rows interleaved: a single wide MMA per step.
        j = tl.arange(0, 2 * BLOCK_N)
        w_rows = (j % 2) * I + (n_block * BLOCK_N + j // 2) % I
        gate_up_ptrs = w13_ptr + expert * stride_we + ks[:, None] + w_rows[None, :] * stride_wn
        acc = tl.zeros((BLOCK_M, 2 * BLOCK_N), dtype=tl.float32)
        acc = pointer_k_loop(x_ptrs, gate_up_ptrs, ks, H, acc, BLOCK_K, EVEN_K, DOT_PRECISION)
        acc_gate, acc_up = tl.split(tl.reshape(acc, (BLOCK_M, BLOCK_N, 2)))
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
            acc_gate = tl.dot(a, g, acc_gate, input_precision=DOT_PRECISION)
            acc_up = tl.dot(a, u, acc_up, input_precision=DOT_PRECISION)
            x_ptrs += BLOCK_K
            gate_ptrs += BLOCK_K
            up_ptrs += BLOCK_K
    h = (acc_gate * tl.sigmoid(acc_gate) * acc_up).to(h_ptr.dtype.element_ty)
    if TMA_STORE:
        h_desc.store([row0, n_block * BLOCK_N], h)  # columns past I are dropped by the copy engine
    else:
        h_ptrs = h_ptr + rows[:, None].to(tl.int64) * stride_hm + cols[None, :]
        tl.store(h_ptrs, h, mask=cols[None, :] < I)


@triton.jit
def _gate_up_swiglu_kernel(
    x_ptr, x_desc, w13_ptr, w_desc, h_ptr, h_desc,
    sorted_pair_ptr, block_expert_ptr, num_padded_ptr,
    num_pairs, top_k, H, I,
    stride_xm, stride_we, stride_wn, stride_hm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr, ONE_DOT: tl.constexpr, TMA: tl.constexpr,
    SORTED_X: tl.constexpr, WARP_SPECIALIZE: tl.constexpr, HALF_TILES: tl.constexpr, FLATTEN: tl.constexpr,
    TMA_STORE: tl.constexpr,
):
    num_m_blocks = tl.load(num_padded_ptr) // BLOCK_M
    num_n_blocks = tl.cdiv(I, BLOCK_N)
    for tile in tl.range(tl.program_id(0), num_m_blocks * num_n_blocks, tl.num_programs(0), flatten=FLATTEN):
        m_block, n_block = grouped_tile(tile, num_m_blocks, num_n_blocks, GROUP_M)
        expert = tl.load(block_expert_ptr + m_block).to(tl.int64)
        row0 = m_block * BLOCK_M
        # A block whose second half is all padding (an expert's last rows) is computed as a BLOCK_M/2 tile;
        # the rows left unwritten are padding, whose down results are never stored.
        if HALF_TILES:
            if tl.load(sorted_pair_ptr + row0 + BLOCK_M // 2) >= num_pairs:
                _gate_up_tile(x_ptr, x_desc, w13_ptr, w_desc, h_ptr, h_desc, sorted_pair_ptr,
                              expert, row0, n_block, num_pairs, top_k, H, I, stride_xm, stride_we, stride_wn, stride_hm,
                              BLOCK_M // 2, BLOCK_N, BLOCK_K, EVEN_K, DOT_PRECISION, ONE_DOT, TMA, False, False, False)
            else:
                _gate_up_tile(x_ptr, x_desc, w13_ptr, w_desc, h_ptr, h_desc, sorted_pair_ptr,
                              expert, row0, n_block, num_pairs, top_k, H, I, stride_xm, stride_we, stride_wn, stride_hm,
                              BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, DOT_PRECISION, ONE_DOT, TMA, SORTED_X, WARP_SPECIALIZE,
                              TMA_STORE)
        else:
            _gate_up_tile(x_ptr, x_desc, w13_ptr, w_desc, h_ptr, h_desc, sorted_pair_ptr,
                          expert, row0, n_block, num_pairs, top_k, H, I, stride_xm, stride_we, stride_wn, stride_hm,
                          BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, DOT_PRECISION, ONE_DOT, TMA, SORTED_X, WARP_SPECIALIZE,
                          TMA_STORE)


def gather_sorted_rows(x_MH: torch.Tensor, align: BlockAlignment, top_k: int) -> torch.Tensor:
    """x [M, H] -> x_sorted [R, H]: row r holds its pair's token; padding rows and rows past num_padded_rows stay
    unwritten. Small programs (16 rows x 512 columns): the copy runs near HBM write bandwidth."""
    R, H = align.sorted_pair_R.numel(), x_MH.shape[1]
    x_RH = torch.empty(R, H, dtype=x_MH.dtype, device=x_MH.device)
    rows, block_h = 16, min(512, triton.next_power_of_2(H))
    _gather_sorted_rows_kernel[(triton.cdiv(R, rows), triton.cdiv(H, block_h))](
        x_MH, x_RH, align.sorted_pair_R, align.num_padded_rows, align.num_pairs, top_k, H,
        x_MH.stride(0), x_RH.stride(0), ROWS=rows, BLOCK_H=block_h,
    )
    return x_RH


def gate_up_swiglu(
    x_MH: torch.Tensor, w13_E2IH: torch.Tensor, align: BlockAlignment, top_k: int, config: dict, num_sms: int
) -> torch.Tensor:
    """x [M, H], w13 [E, 2I, H] (gate rows, then up rows) -> h [R, I] in the expert-sorted row layout.

    The TMA flags fall back to pointer loads where the copy engine cannot read the tensors (see tma_fits); the
    GLUON flag runs gate_up_swiglu_gluon.py's kernel (the same result as ONE_DOT with SORTED_X) where it can
    (see gluon_gate_up_fits), this one elsewhere."""
    E, two_I, H = w13_E2IH.shape
    I = two_I // 2
    block_n, block_k, block_m = config["BLOCK_N"], config["BLOCK_K"], align.block_m
    programs = persistent_programs(align.block_expert_B.numel(), triton.cdiv(I, block_n), config, num_sms)
    gluon = gluon_module("gate_up_swiglu_gluon") if config.get("GLUON", False) and x_MH.is_cuda else None
    if gluon is not None and gluon.gluon_gate_up_fits(x_MH, w13_E2IH, block_m, config):
        return gluon.gate_up_swiglu_gluon(x_MH, w13_E2IH, align, top_k, config, programs)
    h_RI = torch.empty(align.sorted_pair_R.numel(), I, dtype=x_MH.dtype, device=x_MH.device)
    tma = config.get("TMA", False) and w13_E2IH.is_contiguous() and tma_fits(x_MH, w13_E2IH)
    sorted_x = tma and config.get("SORTED_X", False)
    half_tiles = config.get("HALF_TILES", False) and block_m >= 32 and not sorted_x
    x, x_desc, w_desc = x_MH, None, None
    if tma and config.get("ONE_DOT", False):
        w_desc = tma_descriptor(w13_E2IH.view(2 * E, I, H), 2, block_n, block_k)
    elif tma:
        w_desc = tma_descriptor(w13_E2IH.view(E * two_I, H), block_n, block_k)
    if sorted_x:
        x = gather_sorted_rows(x_MH, align, top_k)
        x_desc = tma_descriptor(x, block_m, block_k)
    tma_store = tma and config.get("TMA_STORE", False) and not half_tiles and tma_fits(h_RI)
    h_desc = tma_descriptor(h_RI, block_m, block_n) if tma_store else None
    _gate_up_swiglu_kernel[(programs,)](
        x, x_desc, w13_E2IH, w_desc, h_RI, h_desc,
        align.sorted_pair_R, align.block_expert_B, align.num_padded_rows,
        align.num_pairs, top_k, H, I,
        x.stride(0), w13_E2IH.stride(0), w13_E2IH.stride(1), h_RI.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=config["GROUP_M"],
        EVEN_K=H % block_k == 0, DOT_PRECISION="ieee" if x_MH.dtype == torch.float32 else "tf32",
        ONE_DOT=config.get("ONE_DOT", False), TMA=tma, SORTED_X=sorted_x,
        WARP_SPECIALIZE=sorted_x and config.get("WARP_SPECIALIZE", False), HALF_TILES=half_tiles,
        FLATTEN=config.get("FLATTEN", False) and not half_tiles, TMA_STORE=tma_store,
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )
    return h_RI
