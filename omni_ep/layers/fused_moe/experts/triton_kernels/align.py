"""Group the (token, slot) pairs by local expert, each expert's rows padded to a multiple of BLOCK_M.

Everything stays on the device: no count is read back to the host. Buffers are sized by the worst case
(every slot local), and the GEMMs read the real number of padded rows from `num_padded_rows`.

Shape legend: M tokens, K top-k slots, P = M*K pairs (pair p = m*K + k), E local experts,
R = P + E*(BLOCK_M-1) rows of the padded, expert-sorted layout (an upper bound), B = R / BLOCK_M blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass(frozen=True)
class BlockAlignment:
    """Where every local pair sits in the expert-sorted, block-padded row layout.

    sorted_pair_R:    [R] int32  pair index of each row; P (one past the last pair) on padding rows;
                                 rows from num_padded_rows on are unwritten
    block_expert_B:   [B] int32  local expert of each block of BLOCK_M rows; E past the used blocks
    num_padded_rows:  [1] int32  rows in use (a multiple of BLOCK_M), read by the GEMMs on the device
    row_of_pair_P:    [P] int32  the row of each local pair (the inverse of sorted_pair_R); -1 for pairs whose
                                 expert is not local
    expert_end_E:     [E] int32  one past each expert's last padded row (a grouped GEMM's group offsets)
    """

    sorted_pair_R: torch.Tensor
    block_expert_B: torch.Tensor
    num_padded_rows: torch.Tensor
    row_of_pair_P: torch.Tensor
    expert_end_E: torch.Tensor
    block_m: int
    num_pairs: int


@triton.jit
def _count_pairs_kernel(ids_ptr, counts_ptr, rank_ptr, num_pairs, num_experts, BLOCK: tl.constexpr):
    """counts[e] = pairs routed to e; rank[p] = arrival order of pair p among its expert's pairs."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    in_range = offs < num_pairs
    ids = tl.load(ids_ptr + offs, mask=in_range, other=-1).to(tl.int32)
    local = in_range & (ids >= 0) & (ids < num_experts)
    rank = tl.atomic_add(counts_ptr + tl.where(local, ids, 0), 1, mask=local)
    tl.store(rank_ptr + offs, rank, mask=local)


@triton.jit
def _block_offsets_kernel(
    counts_ptr,
    expert_start_ptr,
    expert_end_ptr,
    block_expert_ptr,
    num_padded_ptr,
    sorted_pair_ptr,
    num_pairs,
    num_experts,
    max_blocks,
    BLOCK_M: tl.constexpr,
    E_POW2: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    """One program: padded counts, their exclusive prefix sum, the expert owning each block, and the
    padding rows (after each expert's pairs) marked with the sentinel pair index num_pairs."""
    e = tl.arange(0, E_POW2)
    is_expert = e < num_experts
    counts = tl.load(counts_ptr + e, mask=is_expert, other=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    end = tl.cumsum(padded, 0)
    tl.store(expert_start_ptr + e, end - padded, mask=is_expert)
    tl.store(expert_end_ptr + e, end, mask=is_expert)
    tl.store(num_padded_ptr, tl.sum(padded, 0))
    pad_rows = (end - padded + counts)[:, None] + tl.arange(0, BLOCK_M)[None, :]
    tl.store(sorted_pair_ptr + pad_rows, num_pairs, mask=is_expert[:, None] & (pad_rows < end[:, None]))
    end_block = tl.where(is_expert, end // BLOCK_M, 2147483647)
    for b0 in range(0, max_blocks, BLOCK_B):
        b = b0 + tl.arange(0, BLOCK_B)
        # The expert of block b is the number of experts whose padded rows end at or before it.
        owner = tl.sum((end_block[None, :] <= b[:, None]).to(tl.int32), axis=1)
        tl.store(block_expert_ptr + b, owner, mask=b < max_blocks)


@triton.jit
def _place_pairs_kernel(ids_ptr, rank_ptr, expert_start_ptr, sorted_pair_ptr, row_of_pair_ptr, num_pairs,
                        num_experts, BLOCK: tl.constexpr):
    """sorted_pair[start[e] + rank[p]] = p and row_of_pair[p] = start[e] + rank[p] for every local pair p of
    expert e; row_of_pair[p] = -1 for the others."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    in_range = offs < num_pairs
    ids = tl.load(ids_ptr + offs, mask=in_range, other=-1).to(tl.int32)
    local = in_range & (ids >= 0) & (ids < num_experts)
    start = tl.load(expert_start_ptr + ids, mask=local, other=0)
    rank = tl.load(rank_ptr + offs, mask=local, other=0)
    tl.store(sorted_pair_ptr + start + rank, offs, mask=local)
    tl.store(row_of_pair_ptr + offs, tl.where(local, start + rank, -1), mask=in_range)


def align_pairs_to_blocks(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> BlockAlignment:
    """topk_ids [M, K] (local expert id, or -1 for a slot whose expert lives elsewhere) -> BlockAlignment.

    Ids outside [0, num_experts) are treated as non-local. The order of pairs inside one expert follows
    atomic arrival and may change between runs; each row's result does not depend on it.
    """
    ids_P = topk_ids.reshape(-1)
    if not ids_P.is_contiguous():
        ids_P = ids_P.contiguous()
    num_pairs = ids_P.numel()
    device = ids_P.device
    max_rows = num_pairs + num_experts * (block_m - 1)
    max_blocks = triton.cdiv(max_rows, block_m)
    counts_E = torch.zeros(num_experts, dtype=torch.int32, device=device)
    rank_P = torch.empty(num_pairs, dtype=torch.int32, device=device)
    row_of_pair_P = torch.empty(num_pairs, dtype=torch.int32, device=device)
    expert_start_E = torch.empty(num_experts, dtype=torch.int32, device=device)
    expert_end_E = torch.empty(num_experts, dtype=torch.int32, device=device)
    block_expert_B = torch.empty(max_blocks, dtype=torch.int32, device=device)
    num_padded_rows = torch.empty(1, dtype=torch.int32, device=device)
    sorted_pair_R = torch.empty(max_blocks * block_m, dtype=torch.int32, device=device)  # rows past the used
    # blocks stay unwritten: the GEMMs stop at num_padded_rows
    block = 1024
    grid = (max(triton.cdiv(num_pairs, block), 1),)
    _count_pairs_kernel[grid](ids_P, counts_E, rank_P, num_pairs, num_experts, BLOCK=block)
    _block_offsets_kernel[(1,)](
        counts_E, expert_start_E, expert_end_E, block_expert_B, num_padded_rows, sorted_pair_R, num_pairs, num_experts,
        max_blocks,
        BLOCK_M=block_m, E_POW2=triton.next_power_of_2(num_experts), BLOCK_B=256,
    )
    _place_pairs_kernel[grid](ids_P, rank_P, expert_start_E, sorted_pair_R, row_of_pair_P, num_pairs, num_experts,
                              BLOCK=block)
    return BlockAlignment(sorted_pair_R, block_expert_B, num_padded_rows, row_of_pair_P, expert_end_E, block_m,
                          num_pairs)
