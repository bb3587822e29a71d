"""The pieces the Gluon expert GEMMs share: tile order, each program's tile count, and the warp-specialised
shared-memory ring (a loader warp fills stages by TMA, the MMA warps consume them).

The ring has STAGES stages, each with two mbarriers: `ready` flips when the stage's TMA reads have landed,
`empty` when the MMA that read it has finished. The loader and the MMA warps walk the same tiles and K steps,
counting steps across tiles, so step s uses stage s % STAGES in phase (s // STAGES) & 1.

Needs Triton with Gluon (3.6 or later); the kernels that use it run on compute-capability-9 GPUs only.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait

# Triton 3.6 calls the TMA load and store async_copy_global_to_shared / _shared_to_global; later versions call
# them async_load / async_store.
tma_load = tma.async_load if hasattr(tma, "async_load") else tma.async_copy_global_to_shared
tma_store = tma.async_store if hasattr(tma, "async_store") else tma.async_copy_shared_to_global

# Warp-specialised kernels: one loader warp with LOADER_REGS registers a thread; the MMA warps get the rest of
# MAX_REGS x (num_warps + 4) x 32 (registers are handed out by warpgroup).
LOADER_REGS = 40
MAX_REGS = 168


@gluon.jit
def tile_coords(tile, num_m_blocks, num_n_blocks, GROUP_M: gl.constexpr):
    """gemm_tiles.grouped_tile in Gluon: GROUP_M row blocks down each column of tiles before moving right."""
    tiles_per_group = GROUP_M * num_n_blocks
    first_m = (tile // tiles_per_group) * GROUP_M
    group_rows = gl.minimum(num_m_blocks - first_m, GROUP_M)
    return first_m + (tile % tiles_per_group) % group_rows, (tile % tiles_per_group) // group_rows


@gluon.jit
def program_tile(t, num_m_blocks, num_n_blocks, GROUP_M: gl.constexpr):
    """(m block, n block) of this persistent program's t-th tile: tile pid + t * programs."""
    return tile_coords(gl.program_id(0) + t * gl.num_programs(0), num_m_blocks, num_n_blocks, GROUP_M)


@gluon.jit
def program_tiles(num_padded_ptr, num_n_blocks, BLOCK_M: gl.constexpr):
    """(row blocks in use, tiles of this persistent program): tiles pid, pid + programs, ..."""
    num_m_blocks = gl.load(num_padded_ptr) // BLOCK_M
    pid = gl.program_id(0)
    return num_m_blocks, gl.cdiv(gl.maximum(num_m_blocks * num_n_blocks - pid, 0), gl.num_programs(0))


@gluon.jit
def wait_free_stage(empty, step, STAGES: gl.constexpr):
    """Loader side: the stage of step `step`, once the MMA that read it STAGES steps ago has finished (a fresh
    barrier counts as having completed the phase before its first, so the first STAGES steps do not wait)."""
    stage = step % STAGES
    mbarrier.wait(empty.index(stage), ((step // STAGES) & 1) ^ 1)
    return stage


@gluon.jit
def mma_k_loop(acc, a_stages, b_stages, ready, empty, step, k_steps):
    """MMA side, one tile: acc [BLOCK_M, N] += A @ B.T over k_steps stages from `step` on, one wgmma in flight;
    each stage is handed back to the loader once the MMA that read it has finished. Returns (acc, next step)."""
    STAGES: gl.constexpr = a_stages.type.shape[0]
    for k_step in range(k_steps):
        stage = step % STAGES
        mbarrier.wait(ready.index(stage), (step // STAGES) & 1)
        acc = warpgroup_mma(a_stages.index(stage), b_stages.index(stage).permute((1, 0)), acc, is_async=True)
        acc = warpgroup_mma_wait(1, deps=(acc, ))
        # The previous MMA of this tile has finished: its stage can be refilled.
        mbarrier.arrive(empty.index((step + STAGES - 1) % STAGES), pred=k_step > 0)
        step += 1
    acc = warpgroup_mma_wait(0, deps=(acc, ))
    mbarrier.arrive(empty.index((step + STAGES - 1) % STAGES))
    return acc, step


@gluon.jit
def init_ring(ready, empty, STAGES: gl.constexpr):
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=1)


@gluon.jit
def invalidate_ring(ready, empty, STAGES: gl.constexpr):
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(ready.index(i))
        mbarrier.invalidate(empty.index(i))
