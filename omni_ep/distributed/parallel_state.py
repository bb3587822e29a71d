"""The one parallel state of a process: the layout, and every process group built from it.

    init_parallel_state(ParallelConfig(tensor_parallel_size=2, enable_expert_parallel=True))
    get_ep_group().world_size   # 2
    destroy_parallel_state()

Every rank creates every group, in the same order (torch.distributed requires it). The layout is
checked against the launched world size on every rank before any group is created.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from omni_ep.config import ParallelConfig
from omni_ep.distributed.group_coordinator import GroupCoordinator
from omni_ep.distributed.rank_groups import all_rank_groups

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass
class ParallelState:
    config: ParallelConfig
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    groups: dict[str, GroupCoordinator] = field(default_factory=dict)
    owns_default_group: bool = False


_STATE: ParallelState | None = None


def _accelerator() -> torch.device | None:
    """This machine's accelerator type (cuda, or npu once torch_npu is imported), or None on a CPU-only one."""
    if not torch.accelerator.is_available():
        return None
    return torch.accelerator.current_accelerator()


def _default_backend() -> str:
    """The collective library torch pairs with this machine's accelerator (nccl, hccl), else gloo."""
    accelerator = _accelerator()
    if accelerator is None:
        return "gloo"
    return dist.Backend.default_device_backend_map.get(accelerator.type, "gloo")


def init_parallel_state(
    config: ParallelConfig,
    backend: str | None = None,
    timeout: timedelta = timedelta(minutes=10),
) -> ParallelState:
    """Join (or start) torch.distributed and build every process group of ``config``.

    Uses an already initialised default group if there is one, else the torchrun environment
    (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). A single process without those variables
    runs without torch.distributed (every group has size 1).
    """
    global _STATE
    if _STATE is not None:
        raise RuntimeError("the parallel state is already initialised; call destroy_parallel_state() first")

    owns_default_group = False
    if dist.is_available() and dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
    elif all(k in os.environ for k in TORCHRUN_ENV) and int(os.environ["WORLD_SIZE"]) > 1:
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        # Checked before the rendezvous, so a wrong layout fails on every rank without a hang.
        config.check_world_size(world_size)
        dist.init_process_group(
            backend=backend or _default_backend(), rank=rank, world_size=world_size, timeout=timeout
        )
        owns_default_group = True
    else:
        rank, world_size = 0, 1
    local_rank = int(os.environ.get("LOCAL_RANK", rank))

    try:
        config.check_world_size(world_size)
    except ValueError:
        if owns_default_group:
            dist.destroy_process_group()
        raise

    backend_in_use = dist.get_backend() if dist.is_initialized() else None
    accelerator = _accelerator()
    if accelerator is not None and backend_in_use != "gloo":  # gloo: CPU tensors even on a GPU machine
        device = torch.device(accelerator.type, local_rank % torch.accelerator.device_count())
        torch.accelerator.set_device_index(device.index)
    else:
        device = torch.device("cpu")

    state = ParallelState(config, rank, world_size, local_rank, device, owns_default_group=owns_default_group)
    for name, rank_lists in all_rank_groups(config).items():
        for ranks in rank_lists:
            # new_group is collective over the whole world: every rank calls it for every group.
            group = dist.new_group(ranks) if len(ranks) > 1 else None
            if rank in ranks:
                state.groups[name] = GroupCoordinator(name, ranks.index(rank), tuple(ranks), group)
    _STATE = state
    return state


def destroy_parallel_state() -> None:
    """Tear down every group this module made (and the default group if it made that too)."""
    global _STATE
    if _STATE is None:
        return
    state, _STATE = _STATE, None
    if state.owns_default_group and dist.is_initialized():
        dist.destroy_process_group()


def is_parallel_state_initialized() -> bool:
    return _STATE is not None


def get_parallel_state() -> ParallelState:
    if _STATE is None:
        raise RuntimeError(
            "the parallel state is not initialised: call omni_ep.distributed.init_parallel_state(ParallelConfig(...)) "
            "first (a single process needs it too)"
        )
    return _STATE


def get_parallel_config() -> ParallelConfig:
    return get_parallel_state().config


def get_group(name: str) -> GroupCoordinator:
    return get_parallel_state().groups[name]


def get_world_group() -> GroupCoordinator:
    return get_group("world")


def get_tp_group() -> GroupCoordinator:
    return get_group("tp")


def get_sp_group() -> GroupCoordinator:
    return get_group("sp")


def get_ulysses_group() -> GroupCoordinator:
    return get_group("ulysses")


def get_ring_group() -> GroupCoordinator:
    return get_group("ring")


def get_cfg_group() -> GroupCoordinator:
    return get_group("cfg")


def get_dp_group() -> GroupCoordinator:
    return get_group("dp")


def get_pp_group() -> GroupCoordinator:
    return get_group("pp")


def get_ep_group() -> GroupCoordinator:
    return get_group("ep")
