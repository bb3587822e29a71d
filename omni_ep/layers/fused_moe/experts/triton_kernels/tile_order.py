"""Tile order shared by the persistent expert GEMMs."""

import triton
import triton.language as tl


@triton.jit
def grouped_tile(tile, num_m_blocks, num_n_blocks, GROUP_M: tl.constexpr):
    """Tile index -> (m block, n block), walking GROUP_M row blocks down each column before moving right,
    so a weight tile is reused from L2 by the neighbouring row blocks (of the same expert, mostly)."""
    tiles_per_group = GROUP_M * num_n_blocks
    first_m = (tile // tiles_per_group) * GROUP_M
    group_rows = tl.minimum(num_m_blocks - first_m, GROUP_M)
    m_block = first_m + (tile % tiles_per_group) % group_rows
    n_block = (tile % tiles_per_group) // group_rows
    return m_block, n_block
