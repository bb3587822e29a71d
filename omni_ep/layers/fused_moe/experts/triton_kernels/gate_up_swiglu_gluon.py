"""GEMM 1 of the local experts on Hopper, written in Gluon, its loads in a warp of their own. The same result
as gate_up_swiglu.py's tma kernel with the same tiles, bit for bit.

h[r, :] = silu(x_sorted[r] @ w13[e, :I].T) * (x_sorted[r] @ w13[e, I:].T) for row r of the expert-sorted layout
(x_sorted: x copied into that order, gate_up_swiglu.gather_sorted_rows, so that its tiles are TMA reads too),
e its block's expert. A persistent program walks its tiles in two partitions over a ring of STAGES
shared-memory stages (gluon_ring.py):
  loader (1 warp)    for every K step, waits for a free stage and fills it by TMA: the x rows [BLOCK_M, BLOCK_K],
                     then the gate rows and the up rows [2*BLOCK_N, BLOCK_K] of the weights;
  MMA (num_warps)    one [BLOCK_M, 2*BLOCK_N] wgmma per K step (gate, then up columns), one in flight; then
                     SwiGLU and a TMA store of h, waited for only before the next tile's epilogue.
The loader runs up to STAGES K steps ahead across tiles, so the next tile's operands arrive during this tile's
epilogue, and the MMA warps never wait on their own loads.

Needs Triton with Gluon (3.6 or later) and a compute-capability-9 GPU; the caller checks (`gluon_gate_up_fits`).
Gluon kernels do not run under TRITON_INTERPRET: tests/gpu/ checks this one on a GPU.

Shape legend: M tokens, H hidden, I intermediate, E local experts, R padded sorted rows (see align.py).
"""

from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from omni_ep.layers.fused_moe.experts.triton_configs import GemmConfig
from omni_ep.layers.fused_moe.experts.triton_kernels.align import BlockAlignment
from omni_ep.layers.fused_moe.experts.triton_kernels.gate_up_swiglu import gather_sorted_rows
from omni_ep.layers.fused_moe.experts.triton_kernels.gemm_tiles import ring_fits
from omni_ep.layers.fused_moe.experts.triton_kernels.gluon_ring import (
    LOADER_REGS,
    MAX_REGS,
    init_ring,
    invalidate_ring,
    mma_k_loop,
    program_tile,
    program_tiles,
    tma_load,
    tma_store,
    wait_free_stage,
)


@gluon.jit
def _loader(x_desc, w_desc, block_expert_ptr, num_padded_ptr, H, I, x_stages, w_stages, ready, empty,
            GROUP_M: gl.constexpr):
    """For every K step of the program's tiles: a free stage, filled with the x tile and the gate and up tiles."""
    BLOCK_M: gl.constexpr = x_desc.block_type.shape[0]
    BLOCK_K: gl.constexpr = x_desc.block_type.shape[1]
    BLOCK_N: gl.constexpr = w_desc.block_type.shape[0]
    STAGES: gl.constexpr = x_stages.type.shape[0]
    num_n_blocks = gl.cdiv(I, BLOCK_N)
    num_m_blocks, my_tiles = program_tiles(num_padded_ptr, num_n_blocks, BLOCK_M)
    step = 0
    for t in range(my_tiles):
        m_block, n_block = program_tile(t, num_m_blocks, num_n_blocks, GROUP_M)
        gate_row = gl.load(block_expert_ptr + m_block) * 2 * I + n_block * BLOCK_N
        for k_step in range(gl.cdiv(H, BLOCK_K)):
            stage = wait_free_stage(empty, step, STAGES)
            bar = ready.index(stage)
            w_stage = w_stages.index(stage)
            mbarrier.expect(bar, x_desc.block_type.nbytes + 2 * w_desc.block_type.nbytes)
            tma_load(x_desc, [m_block * BLOCK_M, k_step * BLOCK_K], bar, x_stages.index(stage))
            tma_load(w_desc, [gate_row, k_step * BLOCK_K], bar, w_stage.slice(0, BLOCK_N))
            tma_load(w_desc, [gate_row + I, k_step * BLOCK_K], bar, w_stage.slice(BLOCK_N, BLOCK_N))
            step += 1


@gluon.jit
def _mma(h_desc, num_padded_ptr, H, I, x_stages, w_stages, ready, empty, h_tile, GROUP_M: gl.constexpr,
         num_warps: gl.constexpr):
    """The program's tiles: the K loop over the ring, then SwiGLU and the h tile's TMA store."""
    BLOCK_M: gl.constexpr = h_desc.block_type.shape[0]
    BLOCK_N: gl.constexpr = h_desc.block_type.shape[1]
    BLOCK_K: gl.constexpr = x_stages.type.shape[2]
    # The accumulator as wgmma leaves it: warps stacked along the rows, 16 rows each; gate columns, then up.
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                         instr_shape=[16, 2 * BLOCK_N, 16])
    num_n_blocks = gl.cdiv(I, BLOCK_N)
    num_m_blocks, my_tiles = program_tiles(num_padded_ptr, num_n_blocks, BLOCK_M)
    step = 0
    for t in range(my_tiles):
        m_block, n_block = program_tile(t, num_m_blocks, num_n_blocks, GROUP_M)
        acc = gl.zeros((BLOCK_M, 2 * BLOCK_N), dtype=gl.float32, layout=acc_layout)
        acc, step = mma_k_loop(acc, x_stages, w_stages, ready, empty, step, gl.cdiv(H, BLOCK_K))
        gate, up = gl.split(gl.permute(gl.reshape(acc, [BLOCK_M, 2, BLOCK_N]), (0, 2, 1)))
        h = gate * (1 / (1 + gl.exp(-gate))) * up  # tl.sigmoid's formula
        # The previous tile's store has had this tile's K loop to finish before the staging tile is reused.
        tma.store_wait(0)
        h_tile.store(h.to(h_desc.dtype))
        fence_async_shared()
        tma_store(h_desc, [m_block * BLOCK_M, n_block * BLOCK_N], h_tile)
    tma.store_wait(0)


@gluon.jit
def _gate_up_swiglu_gluon_kernel(x_desc, w_desc, h_desc, block_expert_ptr, num_padded_ptr, H, I,
                                 GROUP_M: gl.constexpr, STAGES: gl.constexpr, NUM_LOADER_REGS: gl.constexpr,
                                 num_warps: gl.constexpr):
    BLOCK_M: gl.constexpr = x_desc.block_type.shape[0]
    BLOCK_K: gl.constexpr = x_desc.block_type.shape[1]
    BLOCK_N: gl.constexpr = w_desc.block_type.shape[0]
    x_stages = gl.allocate_shared_memory(x_desc.dtype, [STAGES, BLOCK_M, BLOCK_K], x_desc.layout)
    w_stages = gl.allocate_shared_memory(w_desc.dtype, [STAGES, 2 * BLOCK_N, BLOCK_K], w_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    h_tile = gl.allocate_shared_memory(h_desc.dtype, [BLOCK_M, BLOCK_N], h_desc.layout)
    init_ring(ready, empty, STAGES)
    gl.warp_specialize([
        (_mma, (h_desc, num_padded_ptr, H, I, x_stages, w_stages, ready, empty, h_tile, GROUP_M, num_warps)),
        (_loader, (x_desc, w_desc, block_expert_ptr, num_padded_ptr, H, I, x_stages, w_stages, ready, empty,
                   GROUP_M)),
    ], [1], [NUM_LOADER_REGS])
    invalidate_ring(ready, empty, STAGES)


def gluon_gate_up_fits(x_MH: torch.Tensor, w13_E2IH: torch.Tensor, block_m: int, config: GemmConfig) -> bool:
    """Whether this kernel runs the config (whose warps and widths MoEConfig has checked) on these tensors: a
    Hopper GPU, 16-bit floats, BLOCK_N dividing I, TMA-readable x rows, weights and h, and the operand ring
    plus the h staging tile in shared memory."""
    E, two_I, H = w13_E2IH.shape
    elt = x_MH.element_size()
    return (
        x_MH.device.type == "cuda"
        and torch.cuda.get_device_capability(x_MH.device)[0] == 9
        and x_MH.dtype in (torch.bfloat16, torch.float16)
        and (two_I // 2) % config.block_n == 0
        and H * elt % 16 == 0 and (two_I // 2) * elt % 16 == 0
        and w13_E2IH.is_contiguous() and w13_E2IH.data_ptr() % 16 == 0
        and ring_fits(block_m, 2 * config.block_n, config.block_k, config.num_stages, elt, config.block_n)
    )


def gate_up_swiglu_gluon(x_MH: torch.Tensor, w13_E2IH: torch.Tensor, align: BlockAlignment, top_k: int,
                         config: GemmConfig, programs: int) -> torch.Tensor:
    """x [M, H], w13 [E, 2I, H] (contiguous) -> h [R, I] in the expert-sorted layout."""
    E, two_I, H = w13_E2IH.shape
    I = two_I // 2
    block_m, block_n, block_k = align.block_m, config.block_n, config.block_k
    dtype = gl.bfloat16 if x_MH.dtype == torch.bfloat16 else gl.float16
    x_RH, _ = gather_sorted_rows(x_MH, align, top_k)
    h_RI = torch.empty(align.sorted_pair_R.numel(), I, dtype=x_MH.dtype, device=x_MH.device)

    def descriptor(t, rows, cols):
        return TensorDescriptor.from_tensor(t, [rows, cols], gl.NVMMASharedLayout.get_default_for([rows, cols], dtype))

    _gate_up_swiglu_gluon_kernel[(programs,)](
        descriptor(x_RH, block_m, block_k), descriptor(w13_E2IH.view(E * two_I, H), block_n, block_k),
        descriptor(h_RI, block_m, block_n), align.block_expert_B, align.num_padded_rows, H, I,
        GROUP_M=config.group_m, STAGES=config.num_stages, NUM_LOADER_REGS=LOADER_REGS,
        num_warps=config.num_warps, maxnreg=MAX_REGS,
    )
    return h_RI
