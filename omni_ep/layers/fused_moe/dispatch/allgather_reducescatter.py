"""Dispatch by all-gather, combine by reduce-scatter (vLLM-Omni's default diffusion backend).

Every rank gathers every rank's tokens and top-k choices (padded to the largest token count), runs its
local experts on the pairs routed to them, and reduce-scatter sums the partial outputs back.
Traffic per rank grows with EP; simple and robust.

Shape legend: T tokens on this rank, P = max tokens over ranks, R = EP size, K top-k, H hidden.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from omni_ep.layers.fused_moe.dispatch.base import DispatchResult, Dispatcher, Pending, to_local_ids


@dataclass(frozen=True)
class AllGatherMetadata:
    num_tokens: int  # T of this rank
    padded_tokens: int  # P


class AllGatherReduceScatterDispatcher(Dispatcher):
    name = "allgather_reducescatter"

    def dispatch_async(self, hidden_states, topk_ids, topk_weights, max_tokens=None):
        group = self.ep_group
        T, K = topk_ids.shape
        P = max(self.token_bound(T, max_tokens, hidden_states.device), 1)
        pad = P - T
        x_PH = torch.nn.functional.pad(hidden_states, (0, 0, 0, pad))
        # ids travel as fp32 beside the weights (exact below 2^24), -1 on padding rows: one collective for both.
        routing_PK2 = torch.cat([topk_ids.float(), topk_weights.float()], dim=1)
        routing_PK2 = torch.nn.functional.pad(routing_PK2, (0, 0, 0, pad), value=-1.0)
        x_RPH, x_work = group.all_gather(x_PH, async_op=True)
        routing_RPK2, routing_work = group.all_gather(routing_PK2, async_op=True)
        expert_map, _ = self.tables(hidden_states.device)

        def finish():
            ids = to_local_ids(routing_RPK2[:, :K].long(), expert_map)
            return DispatchResult(x_RPH, ids, routing_RPK2[:, K:], AllGatherMetadata(T, P))

        return Pending([x_work, routing_work], finish)

    def combine_async(self, expert_output, metadata: AllGatherMetadata):
        # Summed in fp32 and cast once, as the all-to-all backend's combine does.
        out_PH, work = self.ep_group.reduce_scatter(expert_output.float(), async_op=True)
        return Pending([work], lambda: out_PH[: metadata.num_tokens].to(expert_output.dtype))
