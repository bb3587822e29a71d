"""Dispatch by all-gather, combine by reduce-scatter (vLLM-Omni's default diffusion backend).

Every rank gathers every rank's tokens and top-k choices (padded to the largest token count), runs its
local experts on the pairs routed to them, and reduce-scatter sums the partial outputs back.
Traffic per rank grows with EP; simple and robust.

Shape legend: T tokens on this rank, P = max tokens over ranks, R = EP size, K top-k, H hidden.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from omni_ep.layers.fused_moe.dispatch.base import DispatchResult, Dispatcher, to_local_ids


@dataclass(frozen=True)
class AllGatherMetadata:
    num_tokens: int  # T of this rank
    padded_tokens: int  # P


class AllGatherReduceScatterDispatcher(Dispatcher):
    name = "allgather_reducescatter"

    def dispatch(self, hidden_states, topk_ids, topk_weights, max_tokens=None):
        group = self.ep_group
        T = hidden_states.shape[0]
        P = max(self.token_bound(T, max_tokens, hidden_states.device), 1)
        pad = P - T
        x_PH = torch.nn.functional.pad(hidden_states, (0, 0, 0, pad))
        ids_PK = torch.nn.functional.pad(topk_ids, (0, 0, 0, pad), value=-1)
        w_PK = torch.nn.functional.pad(topk_weights, (0, 0, 0, pad))
        x_RPH = group.all_gather(x_PH)
        ids_RPK = group.all_gather(ids_PK)
        w_RPK = group.all_gather(w_PK)
        expert_map, _ = self.tables(ids_RPK.device)
        return DispatchResult(x_RPH, to_local_ids(ids_RPK, expert_map), w_RPK, AllGatherMetadata(T, P))

    def combine(self, expert_output, metadata: AllGatherMetadata):
        # Summed in fp32 and cast once, as the all-to-all backend's combine does.
        out_PH = self.ep_group.reduce_scatter(expert_output.float())
        return out_PH[: metadata.num_tokens].to(expert_output.dtype)
