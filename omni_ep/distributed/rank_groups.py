"""Pure construction of every process group's rank lists from one orthogonal layout.

Ranks are laid out in the order "tp-sp-pp-cfg-dp" (TP varies fastest, DP slowest), with SP itself
split as ulysses x ring (ulysses faster):

    rank = tp + TP * (ulysses + U * (ring + R * (pp + PP * (cfg + CFG * dp))))

A group over a set of dimensions is a set of ranks that differ ONLY in those coordinates (the Megatron
way), so every rank is in exactly one group of each kind. The expert-parallel group spans every
dimension but PP: the EP group of a rank is all ranks of its pipeline stage.

Worked example, 16 ranks, TP=2 CFG=2 DP=4:
    tp  -> [0, 1] [2, 3] ... [14, 15]
    cfg -> [0, 2] [1, 3] [4, 6] [5, 7] ...
    dp  -> [0, 4, 8, 12] [1, 5, 9, 13] [2, 6, 10, 14] [3, 7, 11, 15]
    ep  -> [0, 1, ..., 15]
"""

from __future__ import annotations

import itertools

from omni_ep.config import ParallelConfig

# Layout dimensions, fastest-varying first.
RANK_ORDER = ("tp", "ulysses", "ring", "pp", "cfg", "dp")

# Each group kind and the layout dimensions its members differ in.
GROUP_DIMS: dict[str, tuple[str, ...]] = {
    "tp": ("tp",),
    "ulysses": ("ulysses",),
    "ring": ("ring",),
    "sp": ("ulysses", "ring"),
    "pp": ("pp",),
    "cfg": ("cfg",),
    "dp": ("dp",),
    "ep": ("tp", "ulysses", "ring", "cfg", "dp"),
    "world": RANK_ORDER,
}


def layout_sizes(config: ParallelConfig) -> dict[str, int]:
    """The size of each layout dimension, in RANK_ORDER."""
    return {
        "tp": config.tensor_parallel_size,
        "ulysses": config.ulysses_degree,
        "ring": config.ring_degree,
        "pp": config.pipeline_parallel_size,
        "cfg": config.cfg_parallel_size,
        "dp": config.data_parallel_size,
    }


def rank_coordinates(rank: int, sizes: dict[str, int]) -> dict[str, int]:
    """The coordinate of ``rank`` along each dimension of the layout."""
    coords = {}
    for dim in RANK_ORDER:
        coords[dim] = rank % sizes[dim]
        rank //= sizes[dim]
    return coords


def rank_of(coords: dict[str, int], sizes: dict[str, int]) -> int:
    """Inverse of rank_coordinates."""
    rank, stride = 0, 1
    for dim in RANK_ORDER:
        rank += coords[dim] * stride
        stride *= sizes[dim]
    return rank


def rank_groups(sizes: dict[str, int], dims: tuple[str, ...]) -> list[list[int]]:
    """All groups of ranks that differ only along ``dims``; each group sorted, groups sorted by first rank."""
    unknown = set(dims) - set(RANK_ORDER)
    if unknown:
        raise ValueError(f"unknown layout dimension(s) {sorted(unknown)}; known: {RANK_ORDER}")
    fixed = [d for d in RANK_ORDER if d not in dims]
    groups = []
    for fixed_coords in itertools.product(*(range(sizes[d]) for d in reversed(fixed))):
        base = dict(zip(reversed(fixed), fixed_coords))
        members = []
        for free_coords in itertools.product(*(range(sizes[d]) for d in dims)):
            members.append(rank_of({**base, **dict(zip(dims, free_coords))}, sizes))
        groups.append(sorted(members))
    return sorted(groups)


def all_rank_groups(config: ParallelConfig) -> dict[str, list[list[int]]]:
    """Every group kind of the layout, as rank lists. EP is one group per pipeline stage when enabled;
    with expert parallel off each rank is its own EP group (experts are tensor-parallel instead)."""
    sizes = layout_sizes(config)
    groups = {name: rank_groups(sizes, dims) for name, dims in GROUP_DIMS.items()}
    if not config.enable_expert_parallel:
        groups["ep"] = [[r] for r in range(config.world_size)]
    return groups
