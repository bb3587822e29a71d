"""GEMM 2 of the local experts on Hopper, written in Gluon (Triton's explicit-layout dialect): the same result as
down_unpermute.py, bit for bit, with the software pipeline spelled out.

y[p, :] = w[p] * (h[r] @ w2[e].T) for row r holding pair p. A persistent program walks its tiles; both
operand tiles of every K step come by TMA into a ring of STAGES shared-memory stages, each with an mbarrier
that flips when its two copies have landed. One wgmma stays in flight while the next is issued, and the
stage the finished one read is refilled at once, with the K steps of the program's next tile as soon as this
tile's run out: the next tile's first operands arrive during this tile's epilogue. The next tile's expert
and this tile's pair ids and routing weights are read at the start of a tile, so no load waits in the loop.
With SORTED_Y the tile goes to the sorted rows it was computed on: written once into a shared-memory staging
tile, then by an asynchronous TMA store that is waited for only before the next tile's epilogue, so the copy
engine writes it during the next tile's K loop (one contiguous tile instead of BLOCK_M scattered rows; the
top-k sum then reads each pair's row through align's row_of_pair). Without it, rows are scattered to the pairs'
slots as in down_unpermute.py.

Needs Triton with Gluon (3.6 or later) and a compute-capability-9 GPU; the caller checks (`gluon_fits`).
Gluon kernels do not run under TRITON_INTERPRET: tests/gpu/ checks this one on a GPU.

Shape legend: P = M*K pairs, H hidden, I intermediate, E local experts, R padded sorted rows (see align.py).
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from omni_ep.layers.fused_moe.experts.triton_configs import GemmConfig
from omni_ep.layers.fused_moe.experts.triton_kernels.align import BlockAlignment
from omni_ep.layers.fused_moe.experts.triton_kernels.gemm_tiles import ring_fits
from omni_ep.layers.fused_moe.experts.triton_kernels.gluon_ring import program_tiles, tile_coords, tma_load, tma_store


@gluon.jit
def _load_k_step(pred, m_block, n_block, expert, k_step, h_desc, w_desc, h_stages, w_stages, ready, stage, H,
                 BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr):
    """TMA reads of one K step's h tile [BLOCK_M, BLOCK_K] and weight tile [BLOCK_N, BLOCK_K] into `stage`."""
    bar = ready.index(stage)
    mbarrier.expect(bar, h_desc.block_type.nbytes + w_desc.block_type.nbytes, pred=pred)
    tma_load(h_desc, [m_block * BLOCK_M, k_step * BLOCK_K], bar, h_stages.index(stage), pred)
    tma_load(w_desc, [expert * H + n_block * BLOCK_N, k_step * BLOCK_K], bar, w_stages.index(stage), pred)


@gluon.jit
def _down_unpermute_gluon_kernel(h_desc, w_desc, y_ptr, y_desc, topk_weights_ptr, sorted_pair_ptr, block_expert_ptr,
                                 num_padded_ptr, num_pairs, H, I, stride_ym,
                                 GROUP_M: gl.constexpr, STAGES: gl.constexpr, SORTED_Y: gl.constexpr,
                                 num_warps: gl.constexpr):
    BLOCK_M: gl.constexpr = h_desc.block_type.shape[0]
    BLOCK_K: gl.constexpr = h_desc.block_type.shape[1]
    BLOCK_N: gl.constexpr = w_desc.block_type.shape[0]
    # The accumulator as wgmma leaves it: warps stacked along the rows, 16 rows each.
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                         instr_shape=[16, BLOCK_N, 16])
    # For the stores: 8 consecutive columns (16 bytes) per thread, a warp along a row.
    store_layout: gl.constexpr = gl.BlockedLayout([1, 8], [1, 32], [num_warps, 1], [1, 0])

    h_stages = gl.allocate_shared_memory(h_desc.dtype, [STAGES, BLOCK_M, BLOCK_K], h_desc.layout)
    w_stages = gl.allocate_shared_memory(w_desc.dtype, [STAGES, BLOCK_N, BLOCK_K], w_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    if SORTED_Y:
        y_tile = gl.allocate_shared_memory(y_desc.dtype, [BLOCK_M, BLOCK_N], y_desc.layout)
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)

    pid = gl.program_id(0)
    num_programs = gl.num_programs(0)
    num_n_blocks = gl.cdiv(H, BLOCK_N)
    num_m_blocks, my_tiles = program_tiles(num_padded_ptr, num_n_blocks, BLOCK_M)
    k_steps = gl.cdiv(I, BLOCK_K)  # >= STAGES - 1 (checked by the caller)

    # The first tile's first STAGES - 1 K steps in flight.
    m_block, n_block = tile_coords(pid, num_m_blocks, num_n_blocks, GROUP_M)
    expert = gl.load(block_expert_ptr + m_block, mask=my_tiles > 0, other=0)
    for first in gl.static_range(STAGES - 1):
        _load_k_step(my_tiles > 0, m_block, n_block, expert, first, h_desc, w_desc, h_stages, w_stages, ready,
                     first, H, BLOCK_M, BLOCK_N, BLOCK_K)

    step = 0
    for t in range(my_tiles):
        has_next = t + 1 < my_tiles
        next_m, next_n = tile_coords(pid + (t + 1) * num_programs, num_m_blocks, num_n_blocks, GROUP_M)
        next_expert = gl.load(block_expert_ptr + next_m, mask=has_next, other=0)
        rows = m_block * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, acc_layout))
        pair = gl.load(sorted_pair_ptr + rows)
        weight = gl.load(topk_weights_ptr + pair, mask=pair < num_pairs, other=0.0).to(gl.float32)
        store_pair = gl.load(sorted_pair_ptr + m_block * BLOCK_M +
                             gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, store_layout)))

        acc = gl.zeros((BLOCK_M, BLOCK_N), dtype=gl.float32, layout=acc_layout)
        for k_step in range(k_steps):
            stage = step % STAGES
            mbarrier.wait(ready.index(stage), (step // STAGES) & 1)
            acc = warpgroup_mma(h_stages.index(stage), w_stages.index(stage).permute((1, 0)), acc, is_async=True)
            # One MMA stays in flight; the one before it has finished, so its stage is refilled now.
            acc = warpgroup_mma_wait(1, deps=(acc, ))
            ahead = k_step + STAGES - 1
            in_next = ahead >= k_steps
            _load_k_step(~in_next | has_next, gl.where(in_next, next_m, m_block),
                         gl.where(in_next, next_n, n_block), gl.where(in_next, next_expert, expert),
                         gl.where(in_next, ahead - k_steps, ahead), h_desc, w_desc, h_stages, w_stages, ready,
                         (step + STAGES - 1) % STAGES, H, BLOCK_M, BLOCK_N, BLOCK_K)
            step += 1
        acc = warpgroup_mma_wait(0, deps=(acc, ))

        if SORTED_Y:
            # The copy engine writes the tile while the next one is multiplied; its previous store has had a
            # whole tile's K loop to finish before the staging tile is overwritten.
            tma.store_wait(0)
            y_tile.store((acc * weight[:, None]).to(y_desc.dtype))
            fence_async_shared()
            tma_store(y_desc, [m_block * BLOCK_M, n_block * BLOCK_N], y_tile)
        else:
            y = gl.convert_layout((acc * weight[:, None]).to(y_ptr.dtype.element_ty), store_layout)
            cols = n_block * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, store_layout))
            y_ptrs = y_ptr + store_pair[:, None].to(gl.int64) * stride_ym + cols[None, :]
            gl.store(y_ptrs, y, mask=(store_pair < num_pairs)[:, None] & (cols[None, :] < H))
        m_block, n_block, expert = next_m, next_n, next_expert

    if SORTED_Y:
        tma.store_wait(0)
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(ready.index(i))


def gluon_fits(h_RI: torch.Tensor, block_m: int, config: GemmConfig, sorted_y: bool = False) -> bool:
    """Whether this kernel runs the config (whose warps and width MoEConfig has checked) on these tensors: a
    Hopper GPU, 16-bit floats, at least STAGES - 1 K steps, and the operand ring (plus the output staging tile
    with sorted_y) in shared memory."""
    return (
        h_RI.device.type == "cuda"
        and torch.cuda.get_device_capability(h_RI.device)[0] == 9
        and h_RI.dtype in (torch.bfloat16, torch.float16)
        and triton.cdiv(h_RI.shape[1], config.block_k) >= config.num_stages - 1
        and ring_fits(block_m, config.block_n, config.block_k, config.num_stages, h_RI.element_size(),
                      config.block_n if sorted_y else 0)
    )


def down_unpermute_gluon(h_RI: torch.Tensor, w2_EHI: torch.Tensor, weights_P: torch.Tensor, y: torch.Tensor,
                         align: BlockAlignment, config: GemmConfig, programs: int, sorted_y: bool = False) -> None:
    """Writes y from h [R, I], w2 [E, H, I] (contiguous), weights [P]: y [P, H] (rows of local pairs), or with
    sorted_y y [R, H] in h's row order (by TMA stores)."""
    E, H, I = w2_EHI.shape
    block_m, block_n, block_k = align.block_m, config.block_n, config.block_k
    dtype = gl.bfloat16 if h_RI.dtype == torch.bfloat16 else gl.float16
    h_layout = gl.NVMMASharedLayout.get_default_for([block_m, block_k], dtype)
    w_layout = gl.NVMMASharedLayout.get_default_for([block_n, block_k], dtype)
    h_desc = TensorDescriptor.from_tensor(h_RI, [block_m, block_k], h_layout)
    w_desc = TensorDescriptor.from_tensor(w2_EHI.view(E * H, I), [block_n, block_k], w_layout)
    y_desc = None
    if sorted_y:
        y_layout = gl.NVMMASharedLayout.get_default_for([block_m, block_n], dtype)
        y_desc = TensorDescriptor.from_tensor(y, [block_m, block_n], y_layout)
    _down_unpermute_gluon_kernel[(programs,)](
        h_desc, w_desc, y, y_desc, weights_P, align.sorted_pair_R, align.block_expert_B, align.num_padded_rows,
        align.num_pairs, H, I, y.stride(0),
        GROUP_M=config.group_m, STAGES=config.num_stages, SORTED_Y=sorted_y, num_warps=config.num_warps,
    )
