"""Process groups: one pure rank-list builder (rank_groups) and one state object (parallel_state)."""

from omni_ep.distributed.group_coordinator import GroupCoordinator
from omni_ep.distributed.parallel_state import (
    ParallelState,
    destroy_parallel_state,
    get_cfg_group,
    get_dp_group,
    get_ep_group,
    get_group,
    get_parallel_config,
    get_parallel_state,
    get_pp_group,
    get_ring_group,
    get_sp_group,
    get_tp_group,
    get_ulysses_group,
    get_world_group,
    init_parallel_state,
    is_parallel_state_initialized,
)
from omni_ep.distributed.rank_groups import all_rank_groups, rank_coordinates, rank_groups

__all__ = [
    "GroupCoordinator",
    "ParallelState",
    "all_rank_groups",
    "destroy_parallel_state",
    "get_cfg_group",
    "get_dp_group",
    "get_ep_group",
    "get_group",
    "get_parallel_config",
    "get_parallel_state",
    "get_pp_group",
    "get_ring_group",
    "get_sp_group",
    "get_tp_group",
    "get_ulysses_group",
    "get_world_group",
    "init_parallel_state",
    "is_parallel_state_initialized",
    "rank_coordinates",
    "rank_groups",
]
