"""Sparse all-to-all dispatch: each token goes ONCE to each rank holding at least one of its experts.

The receiving rank runs those of the token's experts it holds, weights and sums them, and sends one partial
row back; the source adds its partial rows in rank order 0..R-1 (a fixed order: results do not depend on
timing). Token counts are exchanged first (one small all_to_all), then hidden states and routing.

Shape legend: T tokens on this rank, R = EP size, S rows sent (token copies, dedup per destination),
M rows received, K top-k, H hidden.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from omni_ep.layers.fused_moe.dispatch.base import DispatchResult, Dispatcher, to_local_ids


@dataclass(frozen=True)
class AllToAllMetadata:
    num_tokens: int  # T
    send_token: torch.Tensor  # [S] source token index of each sent row, sorted by destination rank
    send_counts: list[int]  # [R] rows sent to each rank
    recv_counts: list[int]  # [R] rows received from each rank


class AllToAllDispatcher(Dispatcher):
    name = "all2all"

    def dispatch(self, hidden_states, topk_ids, topk_weights):
        group = self.ep_group
        R, (T, K) = group.world_size, topk_ids.shape
        device = hidden_states.device
        expert_map, expert_owner = self.tables(device)
        owner_TK = expert_owner[topk_ids]
        wanted_TR = torch.zeros(T, R, dtype=torch.bool, device=device)
        wanted_TR.scatter_(1, owner_TK, True)
        # Rows grouped by destination rank, tokens ascending within each destination.
        dest_S, send_token_S = wanted_TR.t().nonzero(as_tuple=True)
        send_counts_R = torch.bincount(dest_S, minlength=R)
        recv_counts_R = group.all_to_all_single(send_counts_R, [1] * R, [1] * R)
        # Host sync: all_to_all_single takes its split sizes as Python lists.
        send_counts, recv_counts = send_counts_R.tolist(), recv_counts_R.tolist()

        x_MH = group.all_to_all_single(hidden_states[send_token_S], recv_counts, send_counts)
        # ids travel as fp32 beside the weights (exact below 2^24): one collective for both.
        routing_S2K = torch.cat([topk_ids[send_token_S].float(), topk_weights[send_token_S].float()], dim=1)
        routing_M2K = group.all_to_all_single(routing_S2K, recv_counts, send_counts)
        ids_MK = routing_M2K[:, :K].long()
        w_MK = routing_M2K[:, K:]
        metadata = AllToAllMetadata(T, send_token_S, send_counts, recv_counts)
        return DispatchResult(x_MH, to_local_ids(ids_MK, expert_map), w_MK, metadata)

    def combine(self, expert_output, metadata: AllToAllMetadata):
        partial_SH = self.ep_group.all_to_all_single(expert_output, metadata.send_counts, metadata.recv_counts)
        out_TH = torch.zeros(metadata.num_tokens, partial_SH.shape[1], dtype=torch.float32, device=partial_SH.device)
        start = 0
        for count in metadata.send_counts:  # rank order; a token appears at most once per rank
            rows = slice(start, start + count)
            out_TH.index_add_(0, metadata.send_token[rows], partial_SH[rows].float())
            start += count
        return out_TH.to(expert_output.dtype)
