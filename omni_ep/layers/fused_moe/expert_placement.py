"""Which global experts each expert-parallel rank holds, and the expert map of one rank.

Placement "linear": rank r holds the contiguous block [r*E/EP, (r+1)*E/EP).
Placement "round_robin": rank r holds r, r+EP, r+2EP, ... (8 experts on 2 ranks: rank 0 holds 0, 2, 4, 6).
Placement "balanced": per layer, from recorded expert loads (rows routed to each expert, ``expert_loads.py``): each
rank holds E/EP experts and as equal a share of the rows as a greedy split and swaps find. The ranks of one layer wait for
the busiest at the combine, so a rank whose experts get more rows paces every rank.
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


def experts_per_rank(
    num_experts: int, ep_size: int, placement: str, loads: list[int] | None = None
) -> list[list[int]]:
    """Global expert ids held by each EP rank, each list ascending. ``loads`` [E]: the layer's recorded rows per
    expert, for placement "balanced" only."""
    if placement not in EXPERT_PLACEMENTS:
        raise ValueError(f"unknown expert placement {placement!r}; choose one of {', '.join(EXPERT_PLACEMENTS)}")
    if (placement == "balanced") != (loads is not None):
        raise ValueError('expert loads are needed by placement "balanced", and by it only')
    per_rank = num_experts // ep_size
    if placement == "linear":
        return [list(range(r * per_rank, (r + 1) * per_rank)) for r in range(ep_size)]
    if placement == "round_robin":
        return [list(range(r, num_experts, ep_size)) for r in range(ep_size)]
    return balanced_experts_per_rank(loads, ep_size)


def balanced_experts_per_rank(loads: list[int], ep_size: int) -> list[list[int]]:
    """E/EP experts per rank, the busiest rank's rows as few as a greedy split and swaps find: the experts by
    load, heaviest first (ties: lower id first), each to the rank with the fewest rows that has a free slot (ties:
    lower rank); then, while it lowers the busiest rank's rows, the best swap of one of its experts with a
    lighter one of another rank. A pure function of the loads, so every rank computes the same placement without
    talking to the others."""
    num_experts = len(loads)
    if num_experts % ep_size != 0:
        raise ValueError(f"{num_experts} experts cannot be split evenly over expert parallel size {ep_size}")
    per_rank = num_experts // ep_size
    held: list[list[int]] = [[] for _ in range(ep_size)]
    rows = [0] * ep_size
    for expert in sorted(range(num_experts), key=lambda e: (-loads[e], e)):
        rank = min((r for r in range(ep_size) if len(held[r]) < per_rank), key=lambda r: (rows[r], r))
        held[rank].append(expert)
        rows[rank] += loads[expert]
    while True:
        busiest = max(range(ep_size), key=lambda r: (rows[r], -r))
        best = None  # (the pair's new max rows, i, other rank, j, rows moved)
        for other in (r for r in range(ep_size) if r != busiest):
            for i in held[busiest]:
                for j in held[other]:
                    moved = loads[i] - loads[j]
                    new_max = max(rows[busiest] - moved, rows[other] + moved)
                    if moved > 0 and new_max < rows[busiest] and (best is None or new_max < best[0]):
                        best = (new_max, i, other, j, moved)
        if best is None:
            return [sorted(ids) for ids in held]
        _, i, other, j, moved = best
        held[busiest][held[busiest].index(i)], held[other][held[other].index(j)] = j, i
        rows[busiest] -= moved
        rows[other] += moved


def pacing_ratio(loads_LE: list[list[int]], ep_size: int, placement: str) -> float:
    """Rows of the busiest rank summed over layers / rows of a perfectly even split: what a placement costs the
    experts' pace (1.0: none) if a rank's expert time follows its rows."""
    num_experts = len(loads_LE[0])
    paced = even = 0.0
    for loads in loads_LE:
        held = experts_per_rank(num_experts, ep_size, placement, loads if placement == "balanced" else None)
        paced += max(sum(loads[e] for e in ids) for ids in held)
        even += sum(loads) / ep_size
    return paced / even if even else 1.0


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
