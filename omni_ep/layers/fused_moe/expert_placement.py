"""Which global experts each expert-parallel rank holds, and the expert map of one rank.

Placement "linear": rank r holds the contiguous block [r*E/EP, (r+1)*E/EP).
Placement "round_robin": rank r holds r, r+EP, r+2EP, ... (8 experts on 2 ranks: rank 0 holds 0, 2, 4, 6).
"""

from __future__ import annotations

import torch

from omni_ep.config import EXPERT_PLACEMENTS


def check_expert_parallel(num_experts: int, ep_size: int, tp_size: int) -> None:
    """Raise a ValueError that says what to change when the experts cannot be split this way."""
    if tp_size > num_experts:
        raise ValueError(
            f"tensor parallel size {tp_size} is larger than the number of experts {num_experts}; "
            f"use a tensor parallel size <= {num_experts}"
        )
    if num_experts % ep_size != 0:
        raise ValueError(
            f"{num_experts} experts cannot be split evenly over expert parallel size {ep_size} "
            f"(= TP x SP x CFG x DP); choose a layout whose product divides {num_experts}"
        )


def experts_per_rank(num_experts: int, ep_size: int, placement: str) -> list[list[int]]:
    """Global expert ids held by each EP rank, each list ascending."""
    if placement not in EXPERT_PLACEMENTS:
        raise ValueError(f"unknown expert placement {placement!r}; choose one of {', '.join(EXPERT_PLACEMENTS)}")
    per_rank = num_experts // ep_size
    if placement == "linear":
        return [list(range(r * per_rank, (r + 1) * per_rank)) for r in range(ep_size)]
    return [list(range(r, num_experts, ep_size)) for r in range(ep_size)]


def build_expert_map(num_experts: int, local_expert_ids: list[int]) -> torch.Tensor:
    """int32 [E]: the local index of each global expert on this rank, -1 where it lives elsewhere."""
    expert_map = torch.full((num_experts,), -1, dtype=torch.int32)
    expert_map[torch.tensor(local_expert_ids, dtype=torch.long)] = torch.arange(len(local_expert_ids), dtype=torch.int32)
    return expert_map


def build_expert_owner(num_experts: int, placement_per_rank: list[list[int]]) -> torch.Tensor:
    """int64 [E]: the EP rank that holds each global expert."""
    owner = torch.empty(num_experts, dtype=torch.long)
    for rank, ids in enumerate(placement_per_rank):
        owner[torch.tensor(ids, dtype=torch.long)] = rank
    return owner
