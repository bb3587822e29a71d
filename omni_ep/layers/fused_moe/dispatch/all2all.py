"""Sparse all-to-all dispatch: each token goes ONCE to each rank holding at least one of its experts.

The receiving rank runs those of the token's experts it holds, weights and sums them, and sends one partial
row back; the source adds its partial rows in rank order 0..R-1 in fp32 and casts once (a fixed order: results
do not depend on timing).

Buffers have a fixed size, so nothing is read back to the host: rank r's rows for destination d go, compacted
in token order, into block d of a send buffer [R, C + 1, H], where the capacity C is the most tokens any rank
dispatches (``max_tokens``: no block can overflow) and the last row of each block is a dump row for the tokens
that do not go to d. One all_to_all_single with equal splits moves the blocks; routing travels beside them with
-1 ids on unused rows, whose experts output exact zeros. Tokens that reach no expert of a rank cost nothing
there but the rows they occupy on the wire.

Shape legend: T tokens on this rank, R = EP size, C capacity, B = C + 1 rows per block, K top-k, H hidden.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from omni_ep.layers.fused_moe.dispatch.base import DispatchResult, Dispatcher, Pending, to_local_ids
from omni_ep.layers.fused_ops import gather_sum


@dataclass(frozen=True)
class AllToAllMetadata:
    row_TR: torch.Tensor  # int64 [T, R]: row of token t in block r (r * B + slot), or r's dump row


class AllToAllDispatcher(Dispatcher):
    name = "all2all"

    def dispatch_async(self, hidden_states, topk_ids, topk_weights, max_tokens=None):
        group = self.ep_group
        R, (T, K), H = group.world_size, topk_ids.shape, hidden_states.shape[1]
        device = hidden_states.device
        B = self.token_bound(T, max_tokens, device) + 1
        expert_map, expert_owner = self.tables(device)
        wanted_TR = torch.zeros(T, R, dtype=torch.bool, device=device)
        wanted_TR.scatter_(1, expert_owner[topk_ids], True)
        # Compacted position among the tokens sent to each rank (scanned along the inner dim: a fast scan).
        slot_TR = (torch.cumsum(wanted_TR.t().to(torch.int32), dim=1) - 1).t()
        row_TR = torch.where(wanted_TR, slot_TR, B - 1) + B * torch.arange(R, device=device)

        send_x = hidden_states.new_empty(R * B, H)
        # ids travel as fp32 beside the weights (exact below 2^24): one collective for both; -1 ids mark rows
        # that hold no token for the receiver.
        send_routing = torch.full((R * B, 2 * K), -1.0, dtype=torch.float32, device=device)
        routing_TK2 = torch.cat([topk_ids.float(), topk_weights.float()], dim=1)
        for r in range(R):  # dump rows take any token that does not go to r; its ids find no expert on r
            send_x.index_copy_(0, row_TR[:, r], hidden_states)
            send_routing.index_copy_(0, row_TR[:, r], torch.where(wanted_TR[:, r, None], routing_TK2, -1.0))
        x_MH, x_work = group.all_to_all_single(send_x, [B] * R, [B] * R, async_op=True)
        routing_MK2, routing_work = group.all_to_all_single(send_routing, [B] * R, [B] * R, async_op=True)

        def finish():
            ids_MK = to_local_ids(routing_MK2[:, :K].long(), expert_map)
            return DispatchResult(x_MH, ids_MK, routing_MK2[:, K:], AllToAllMetadata(row_TR))

        return Pending([x_work, routing_work], finish)

    def combine_async(self, expert_output, metadata: AllToAllMetadata):
        R = metadata.row_TR.shape[1]
        splits = [expert_output.shape[0] // R] * R
        partial, work = self.ep_group.all_to_all_single(expert_output, splits, splits, async_op=True)

        # In rank order, fp32, one cast; rows a rank did not get are its dump row: exact zeros.
        return Pending([work], lambda: gather_sum(partial, metadata.row_TR))
