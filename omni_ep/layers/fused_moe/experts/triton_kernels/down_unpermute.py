"""GEMM 2 of the local experts: down projection, times the routing weight, written back to the pair's slot.

y[p, :] = w[p] * (h[r] @ w2[e].T) for row r holding pair p = m*K + k: the un-permute is the store address,
so no sorted copy of the output is kept. Rows of pairs that are not local are never written. With SORTED_Y
(and TMA, where its staging tile fits in shared memory) the tile is instead written by the copy engine to the
sorted rows it was computed on, y_sorted [R, H] (padding rows unread), and the top-k sum reads each pair's row
through align's row_of_pair: the un-permute moves into the sum's loads. With the TMA
config flag both operand tiles are read by the copy engine through tensor descriptors (Hopper and later),
and WARP_SPECIALIZE asks Triton to warp-specialise the K loop. With HALF_TILES a row block whose lower half is
all padding (the tail of an expert's rows) is multiplied as a BLOCK_M/2 tile: half the MMA work there. With
FLATTEN (not with HALF_TILES) the tile loop and the K loop are one software pipeline, so the next tile's first
operand loads are in flight during this tile's epilogue.

Shape legend: M tokens, K top-k slots, P = M*K pairs, H hidden, I intermediate, E local experts,
R padded sorted rows (see align.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from omni_ep.layers.fused_moe.experts.triton_kernels.align import BlockAlignment
from omni_ep.layers.fused_moe.experts.triton_kernels.gemm_tiles import (
    gluon_module,
    grouped_tile,
    persistent_programs,
    pointer_k_loop,
    ring_fits,
    tma_descriptor,
    tma_fits,
)


@triton.jit
def _down_tile(
    h_ptr, h_desc, w2_ptr, w_desc, y_ptr, y_desc, topk_weights_ptr, sorted_pair_ptr,
    expert, row0, n_block, num_pairs, H, I,
    stride_hm, stride_we, stride_wn, stride_ym,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr, TMA: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
    SORTED_Y: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_N] output tile: sorted rows row0.. of expert `expert`, columns of n_block."""
    rows = (row0 + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if TMA:
        # Rows of the [E*H, I] weight view; a last partial N block reads the next expert's rows (or
        # zeros past the end), and its columns are not stored.
        w_row = (expert * H).to(tl.int32) + n_block * BLOCK_N
        for k in tl.range(0, tl.cdiv(I, BLOCK_K), warp_specialize=WARP_SPECIALIZE):
            a = h_desc.load([row0, k * BLOCK_K])
            b = w_desc.load([w_row, k * BLOCK_K])
            acc = tl.dot(a, b.T, acc, input_precision=DOT_PRECISION)
    else:
        w_cols = cols % H
        ks = tl.arange(0, BLOCK_K)
        h_ptrs = h_ptr + rows[:, None] * stride_hm + ks[None, :]
        w_ptrs = w2_ptr + expert * stride_we + w_cols[None, :] * stride_wn + ks[:, None]
        acc = pointer_k_loop(h_ptrs, w_ptrs, ks, I, acc, BLOCK_K, EVEN_K, DOT_PRECISION)
    pair = tl.load(sorted_pair_ptr + rows)
    is_pair = pair < num_pairs
    weight = tl.load(topk_weights_ptr + pair, mask=is_pair, other=0.0).to(tl.float32)
    y = acc * weight[:, None]
    if SORTED_Y:
        y_desc.store([row0, n_block * BLOCK_N], y.to(y_desc.dtype))
    else:
        y_ptrs = y_ptr + pair[:, None].to(tl.int64) * stride_ym + cols[None, :]
        tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=is_pair[:, None] & (cols[None, :] < H))


@triton.jit
def _down_unpermute_kernel(
    h_ptr, h_desc, h_half_desc, w2_ptr, w_desc, y_ptr, y_desc, topk_weights_ptr,
    sorted_pair_ptr, block_expert_ptr, num_padded_ptr,
    num_pairs, H, I,
    stride_hm, stride_we, stride_wn, stride_ym,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr, TMA: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
    HALF_TILES: tl.constexpr, FLATTEN: tl.constexpr, SORTED_Y: tl.constexpr,
):
    num_m_blocks = tl.load(num_padded_ptr) // BLOCK_M
    num_n_blocks = tl.cdiv(H, BLOCK_N)
    for tile in tl.range(tl.program_id(0), num_m_blocks * num_n_blocks, tl.num_programs(0), flatten=FLATTEN):
        m_block, n_block = grouped_tile(tile, num_m_blocks, num_n_blocks, GROUP_M)
        expert = tl.load(block_expert_ptr + m_block).to(tl.int64)
        row0 = m_block * BLOCK_M
        # An expert's padding rows close its last block: where they fill the block's second half, multiply
        # the first half alone (padding rows of h may be unwritten: gate_up's HALF_TILES skips them too).
        if HALF_TILES:
            if tl.load(sorted_pair_ptr + row0 + BLOCK_M // 2) >= num_pairs:
                _down_tile(h_ptr, h_half_desc, w2_ptr, w_desc, y_ptr, y_desc, topk_weights_ptr, sorted_pair_ptr,
                           expert, row0, n_block, num_pairs, H, I, stride_hm, stride_we, stride_wn, stride_ym,
                           BLOCK_M // 2, BLOCK_N, BLOCK_K, EVEN_K, DOT_PRECISION, TMA, False, False)
            else:
                _down_tile(h_ptr, h_desc, w2_ptr, w_desc, y_ptr, y_desc, topk_weights_ptr, sorted_pair_ptr,
                           expert, row0, n_block, num_pairs, H, I, stride_hm, stride_we, stride_wn, stride_ym,
                           BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, DOT_PRECISION, TMA, WARP_SPECIALIZE, False)
        else:
            _down_tile(h_ptr, h_desc, w2_ptr, w_desc, y_ptr, y_desc, topk_weights_ptr, sorted_pair_ptr,
                       expert, row0, n_block, num_pairs, H, I, stride_hm, stride_we, stride_wn, stride_ym,
                       BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, DOT_PRECISION, TMA, WARP_SPECIALIZE, SORTED_Y)


def down_unpermute(
    h_RI: torch.Tensor, w2_EHI: torch.Tensor, topk_weights_MK: torch.Tensor, align: BlockAlignment,
    config: dict, num_sms: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """h [R, I] sorted rows, w2 [E, H, I], topk_weights [M, K] -> (y, row_of_pair).

    Without SORTED_Y: y [P, H], row m*K+k for slot k of token m, and row_of_pair None. With it (where the copy
    engine can write y): y [R, H] in h's row order and row_of_pair = align.row_of_pair_P [P]. Rows of slots
    whose expert is not local are left unwritten (uninitialised): read them through the ids.
    The TMA flag falls back to pointer loads where the copy engine cannot read the tensors (see tma_fits); the
    GLUON flag (with TMA) runs down_unpermute_gluon.py's kernel where it can (see gluon_fits), this one elsewhere.
    """
    I = h_RI.shape[1]
    E, H, _ = w2_EHI.shape
    block_m, block_n, block_k = align.block_m, config["BLOCK_N"], config["BLOCK_K"]
    weights_P = topk_weights_MK.reshape(-1)
    if not weights_P.is_contiguous():
        weights_P = weights_P.contiguous()
    tma = config.get("TMA", False) and w2_EHI.is_contiguous() and tma_fits(h_RI, w2_EHI)
    half_tiles = config.get("HALF_TILES", False) and block_m >= 32
    # The sorted output needs a staging tile in shared memory next to the operand ring: where it does not fit,
    # the tile is scattered to the pairs' rows as without the flag.
    sorted_y = (tma and config.get("SORTED_Y", False) and not half_tiles and H * h_RI.element_size() % 16 == 0
                and ring_fits(block_m, block_n, block_k, config["num_stages"], h_RI.element_size(), block_n))
    rows = align.sorted_pair_R.numel() if sorted_y else align.num_pairs
    y = torch.empty(rows, H, dtype=h_RI.dtype, device=h_RI.device)
    row_of_pair = align.row_of_pair_P if sorted_y else None
    programs = persistent_programs(align.block_expert_B.numel(), triton.cdiv(H, block_n), config, num_sms)
    use_gluon = tma and h_RI.is_cuda and config.get("GLUON", False) and not half_tiles
    gluon = gluon_module("down_unpermute_gluon") if use_gluon else None
    if gluon is not None and gluon.gluon_fits(h_RI, block_m, config, sorted_y):
        gluon.down_unpermute_gluon(h_RI, w2_EHI, weights_P, y, align, config, programs, sorted_y)
        return y, row_of_pair
    h_desc = tma_descriptor(h_RI, block_m, block_k) if tma else None
    h_half_desc = tma_descriptor(h_RI, block_m // 2, block_k) if tma and half_tiles else None
    w_desc = tma_descriptor(w2_EHI.view(E * H, I), block_n, block_k) if tma else None
    y_desc = tma_descriptor(y, block_m, block_n) if sorted_y else None
    _down_unpermute_kernel[(programs,)](
        h_RI, h_desc, h_half_desc, w2_EHI, w_desc, y, y_desc, weights_P,
        align.sorted_pair_R, align.block_expert_B, align.num_padded_rows,
        align.num_pairs, H, I,
        h_RI.stride(0), w2_EHI.stride(0), w2_EHI.stride(1), y.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=config["GROUP_M"],
        EVEN_K=I % block_k == 0, DOT_PRECISION="ieee" if h_RI.dtype == torch.float32 else "tf32",
        TMA=tma, WARP_SPECIALIZE=tma and config.get("WARP_SPECIALIZE", False), HALF_TILES=half_tiles,
        FLATTEN=config.get("FLATTEN", False) and not half_tiles, SORTED_Y=sorted_y,
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )
    return y, row_of_pair
