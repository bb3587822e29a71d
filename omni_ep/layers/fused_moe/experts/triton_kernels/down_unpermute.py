"""GEMM 2 of the local experts: down projection, times the routing weight, written back to the pair's slot.

y[p, :] = w[p] * (h[r] @ w2[e].T) for row r holding pair p = m*K + k: the un-permute is the store address,
so no sorted copy of the output is kept. Rows of pairs that are not local are never written. Operand loads, by
config.kernel:
  pointer  h and weight tiles read by pointer (cp.async): any GPU, the interpreter;
  tma      both read by the copy engine through tensor descriptors (Hopper and later);
  gluon    down_unpermute_gluon.py on Hopper: the same tiles over an explicit TMA + mbarrier ring, the next
           tile's loads in flight during this tile's epilogue. Where its output staging tile fits in shared
           memory it writes each tile to the sorted rows it was computed on, y_sorted [R, H], by an
           asynchronous TMA store, and the top-k sum reads each pair's row through align's row_of_pair (the
           un-permute moves into the sum's loads); elsewhere it scatters rows as the kernels here do.

Shape legend: M tokens, K top-k slots, P = M*K pairs, H hidden, I intermediate, E local experts,
R padded sorted rows (see align.py).
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
    persistent_programs,
    pointer_k_loop,
    ring_fits,
    tma_descriptor,
    tma_fits,
)


@triton.jit
def _down_tile(
    h_ptr, h_desc, w2_ptr, w_desc, y_ptr, topk_weights_ptr, sorted_pair_ptr, h_scale_ptr, w_scale_ptr,
    expert, row0, n_block, num_pairs, H, I,
    stride_hm, stride_we, stride_wn, stride_ym, stride_se,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr, TMA: tl.constexpr, SCALED: tl.constexpr,
    FP8_ACC: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_N] output tile: sorted rows row0.. of expert `expert`, columns of n_block."""
    rows = (row0 + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if TMA:
        # Rows of the [E*H, I] weight view; a last partial N block reads the next expert's rows (or
        # zeros past the end), and its columns are not stored.
        w_row = (expert * H).to(tl.int32) + n_block * BLOCK_N
        for k in range(0, tl.cdiv(I, BLOCK_K)):
            a = h_desc.load([row0, k * BLOCK_K])
            b = w_desc.load([w_row, k * BLOCK_K])
            acc = tl.dot(a, b.T, acc, input_precision=DOT_PRECISION, max_num_imprecise_acc=FP8_ACC)
    else:
        w_cols = cols % H
        ks = tl.arange(0, BLOCK_K)
        h_ptrs = h_ptr + rows[:, None] * stride_hm + ks[None, :]
        w_ptrs = w2_ptr + expert * stride_we + w_cols[None, :] * stride_wn + ks[:, None]
        acc = pointer_k_loop(h_ptrs, w_ptrs, ks, I, acc, BLOCK_K, EVEN_K, DOT_PRECISION, FP8_ACC)
    pair = tl.load(sorted_pair_ptr + rows)
    is_pair = pair < num_pairs
    weight = tl.load(topk_weights_ptr + pair, mask=is_pair, other=0.0).to(tl.float32)
    if SCALED:  # FP8 operands: h row scales times the down weight rows' scales
        weight = weight * tl.load(h_scale_ptr + rows)
        acc = acc * tl.load(w_scale_ptr + expert * stride_se + cols % H)[None, :]
    y = acc * weight[:, None]
    y_ptrs = y_ptr + pair[:, None].to(tl.int64) * stride_ym + cols[None, :]
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=is_pair[:, None] & (cols[None, :] < H))


@triton.jit
def _down_unpermute_kernel(
    h_ptr, h_desc, w2_ptr, w_desc, y_ptr, topk_weights_ptr,
    sorted_pair_ptr, block_expert_ptr, num_padded_ptr, h_scale_ptr, w_scale_ptr,
    num_pairs, H, I,
    stride_hm, stride_we, stride_wn, stride_ym, stride_se,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr, TMA: tl.constexpr, SCALED: tl.constexpr,
    FP8_ACC: tl.constexpr,
):
    num_m_blocks = tl.load(num_padded_ptr) // BLOCK_M
    num_n_blocks = tl.cdiv(H, BLOCK_N)
    for tile in range(tl.program_id(0), num_m_blocks * num_n_blocks, tl.num_programs(0)):
        m_block, n_block = grouped_tile(tile, num_m_blocks, num_n_blocks, GROUP_M)
        expert = tl.load(block_expert_ptr + m_block).to(tl.int64)
        _down_tile(h_ptr, h_desc, w2_ptr, w_desc, y_ptr, topk_weights_ptr, sorted_pair_ptr, h_scale_ptr,
                   w_scale_ptr, expert, m_block * BLOCK_M, n_block, num_pairs, H, I, stride_hm, stride_we, stride_wn,
                   stride_ym, stride_se, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, DOT_PRECISION, TMA, SCALED, FP8_ACC)


def down_kernel(h_RI: torch.Tensor, w2_EHI: torch.Tensor, block_m: int, config: GemmConfig) -> tuple[str, bool]:
    """(the kernel down_unpermute runs, whether it writes expert-sorted rows): config.kernel where it can run
    these tensors and tiles, else the next one down (gluon -> tma -> pointer; see gluon_fits and tma_fits). The
    Gluon kernel writes sorted rows where its output staging tile fits in shared memory beside the ring."""
    tma = config.kernel in ("gluon", "tma") and w2_EHI.is_contiguous() and tma_fits(h_RI, w2_EHI)
    if config.kernel == "gluon" and tma and h_RI.is_cuda and h_RI.element_size() > 1:
        gluon = gluon_module("down_unpermute_gluon")
        H, elt = w2_EHI.shape[1], h_RI.element_size()
        sorted_y = H * elt % 16 == 0 and ring_fits(block_m, config.block_n, config.block_k, config.num_stages, elt,
                                                    config.block_n)
        if gluon is not None and gluon.gluon_fits(h_RI, block_m, config, sorted_y):
            return "gluon", sorted_y
    return ("tma" if tma else "pointer"), False


def down_unpermute(
    h_RI: torch.Tensor, w2_EHI: torch.Tensor, topk_weights_MK: torch.Tensor, align: BlockAlignment,
    config: GemmConfig, num_sms: int, h_scale_R: torch.Tensor | None = None, w2_scale_EH: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """h [R, I] sorted rows, w2 [E, H, I], topk_weights [M, K] -> (y, row_of_pair), y in out_dtype (default h's).
    FP8 operands (fp8.py) come with their scales: h_scale [R], w2_scale [E, H].

    Scattered rows: y [P, H], row m*K+k for slot k of token m, and row_of_pair None. Sorted rows (the Gluon
    kernel, see down_kernel): y [R, H] in h's row order and row_of_pair = align.row_of_pair_P [P]. Rows of slots
    whose expert is not local are left unwritten (uninitialised): read them through the ids.
    """
    I = h_RI.shape[1]
    E, H, _ = w2_EHI.shape
    block_m = align.block_m
    weights_P = topk_weights_MK.reshape(-1)
    if not weights_P.is_contiguous():
        weights_P = weights_P.contiguous()
    kernel, sorted_y = down_kernel(h_RI, w2_EHI, block_m, config)
    y = torch.empty(align.sorted_pair_R.numel() if sorted_y else align.num_pairs, H, dtype=out_dtype or h_RI.dtype,
                    device=h_RI.device)
    scaled = h_scale_R is not None
    programs = persistent_programs(align.block_expert_B.numel(), triton.cdiv(H, config.block_n), config, num_sms)
    if kernel == "gluon":
        gluon_module("down_unpermute_gluon").down_unpermute_gluon(h_RI, w2_EHI, weights_P, y, align, config,
                                                                  programs, sorted_y)
        return y, align.row_of_pair_P if sorted_y else None
    tma = kernel == "tma"
    h_desc = tma_descriptor(h_RI, block_m, config.block_k) if tma else None
    w_desc = tma_descriptor(w2_EHI.view(E * H, I), config.block_n, config.block_k) if tma else None
    _down_unpermute_kernel[(programs,)](
        h_RI, h_desc, w2_EHI, w_desc, y, weights_P,
        align.sorted_pair_R, align.block_expert_B, align.num_padded_rows, h_scale_R, w2_scale_EH,
        align.num_pairs, H, I,
        h_RI.stride(0), w2_EHI.stride(0), w2_EHI.stride(1), y.stride(0), w2_scale_EH.stride(0) if scaled else 0,
        BLOCK_M=block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, GROUP_M=config.group_m,
        EVEN_K=I % config.block_k == 0, DOT_PRECISION="ieee" if h_RI.dtype == torch.float32 else "tf32", TMA=tma,
        SCALED=scaled, FP8_ACC=fp8_accumulation(h_RI, config.block_k),
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return y, None
