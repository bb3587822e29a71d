"""The communication side of the MoE seam: dispatch tokens to the ranks holding their experts, combine back.

Shape legend: T tokens on this rank, M tokens received for the local experts, K top-k slots, H hidden.

    dispatched = dispatcher.dispatch(x_TH, topk_ids_TK, topk_weights_TK)      # global ids in
    y_MH = experts.apply(dispatched.hidden_states, dispatched.topk_ids, ...)  # local ids (-1 elsewhere)
    out_TH = dispatcher.combine(y_MH, dispatched.metadata)

Dispatch returns its metadata; combine consumes it. No state is kept on the dispatcher between the two.
Every rank enters every collective of both calls, also with zero tokens.

``dispatch_async`` / ``combine_async`` start the same collectives and return a ``Pending`` whose ``wait()``
gives the result: what the caller launches in between (the shared experts) overlaps
the transfer. On CUDA, wait() makes the current stream wait for the collective; the host does not block.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch

from omni_ep.distributed.group_coordinator import GroupCoordinator


Result = TypeVar("Result")


class Pending(Generic[Result]):
    """A result whose collectives are in flight; ``wait()`` waits for them, then finishes it (once)."""

    def __init__(self, works: Sequence[Any], finish: Callable[[], Result]):
        self._works, self._finish = [w for w in works if w is not None], finish

    def wait(self) -> Result:
        for work in self._works:
            work.wait()
        self._works = []
        return self._finish()


@dataclass(frozen=True)
class DispatchResult:
    hidden_states: torch.Tensor  # [M, H]
    topk_ids: torch.Tensor  # [M, K] local expert id, -1 where the expert is on another rank
    topk_weights: torch.Tensor  # [M, K] fp32
    metadata: Any  # what combine needs; backend specific


def to_local_ids(topk_ids: torch.Tensor, expert_map: torch.Tensor) -> torch.Tensor:
    """Global ids (or -1 padding) -> local ids, -1 where not local. [*, K] -> [*, K] int64.
    ``expert_map`` must be on the device of ``topk_ids``."""
    local = expert_map.long()[topk_ids.clamp(min=0)]
    return torch.where(topk_ids >= 0, local, -1)


class Dispatcher(ABC):
    """Moves tokens between the ranks of one expert-parallel group."""

    name: str = ""

    def __init__(self, ep_group: GroupCoordinator, expert_map: torch.Tensor, expert_owner: torch.Tensor):
        self.ep_group = ep_group
        self._tables = {torch.device("cpu"): (expert_map, expert_owner)}

    def tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(expert_map int32 [E]: global -> local id or -1, expert_owner int64 [E]: global -> EP rank) on
        ``device``, copied there once."""
        if device not in self._tables:
            cpu_map, cpu_owner = self._tables[torch.device("cpu")]
            self._tables[device] = (cpu_map.to(device), cpu_owner.to(device))
        return self._tables[device]

    def token_bound(self, num_tokens: int, max_tokens: int | None, device: torch.device) -> int:
        """The most tokens any rank of the group dispatches: ``max_tokens`` when the caller knows it (no sync),
        else asked from every rank."""
        if max_tokens is not None:
            if num_tokens > max_tokens:
                raise ValueError(f"this rank dispatches {num_tokens} tokens, more than the bound max_tokens={max_tokens}")
            return max_tokens
        # Host sync: the buffer sizes must be known on the host.
        counts = self.ep_group.all_gather(torch.tensor([num_tokens], dtype=torch.long, device=device))
        return int(counts.max())

    def dispatch(
        self,
        hidden_states: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        max_tokens: int | None = None,
    ) -> DispatchResult:
        """x [T, H], global topk_ids [T, K], topk_weights [T, K] -> what this rank's experts get. max_tokens: the
        most tokens any rank of the group dispatches in this call (None: ask them)."""
        return self.dispatch_async(hidden_states, topk_ids, topk_weights, max_tokens).wait()

    def combine(self, expert_output: torch.Tensor, metadata: Any) -> torch.Tensor:
        """The local experts' output [M, H] -> this rank's tokens [T, H], partial rows summed in fp32."""
        return self.combine_async(expert_output, metadata).wait()

    @abstractmethod
    def dispatch_async(
        self, hidden_states: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, max_tokens: int | None
    ) -> Pending[DispatchResult]: ...

    @abstractmethod
    def combine_async(self, expert_output: torch.Tensor, metadata: Any) -> Pending[torch.Tensor]: ...


class LocalDispatcher(Dispatcher):
    """Expert parallel size 1: every expert is local, nothing moves."""

    name = "local"

    def dispatch_async(self, hidden_states, topk_ids, topk_weights, max_tokens=None):
        expert_map, _ = self.tables(topk_ids.device)
        result = DispatchResult(hidden_states, to_local_ids(topk_ids, expert_map), topk_weights, None)
        return Pending([], lambda: result)

    def combine_async(self, expert_output, metadata):
        return Pending([], lambda: expert_output)
