"""Sparse all-to-all dispatch: each token goes ONCE to each rank holding at least one of its experts.

The receiving rank runs those of the token's experts it holds, weights and sums them, and sends one partial
row back; the source adds its partial rows in rank order 0..R-1 in fp32 and casts once (a fixed order: results
do not depend on timing).

Buffers have a fixed size, so nothing is read back to the host: a rank's rows for destination d go, compacted
in token order, into a block of C + 1 rows, where the capacity C is the most tokens any rank dispatches
(``max_tokens``: no block can overflow) and the last row of each block is a dump row for the tokens that do not
go to d. One all_to_all_single moves the blocks of the other ranks; routing travels beside them with -1 ids on
unused rows, whose experts output exact zeros. Tokens that reach no expert of a rank cost nothing there but the
rows they occupy on the wire.

A rank's own block never goes through the collective: dispatch writes it straight behind the blocks it receives,
so the experts read [received blocks (other ranks in rank order) | own block] as one tensor, and the combine
takes the own block's partial rows from the experts' output. Block positions: the other ranks in rank order,
then this rank (``_positions``).

Shape legend: T tokens on this rank, R = EP size, B = C + 1 rows per block, K top-k, H hidden.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from omni_ep.layers.fused_moe.dispatch.base import DispatchResult, Dispatcher, Pending, to_local_ids
from omni_ep.layers.fused_ops import gather_sum, scatter_rows


@dataclass(frozen=True)
class AllToAllMetadata:
    row_TR: torch.Tensor  # int64 [T, R]: row of token t's partial from rank r (its block's dump row if none)


class AllToAllDispatcher(Dispatcher):
    name = "all2all"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._positions_on: dict[torch.device, torch.Tensor] = {}

    def _positions(self, device: torch.device) -> torch.Tensor:
        """int64 [R]: the block position of each rank, the other ranks in rank order and then this one."""
        if device not in self._positions_on:
            R, me = self.ep_group.world_size, self.ep_group.rank
            positions = [r - (r > me) if r != me else R - 1 for r in range(R)]
            self._positions_on[device] = torch.tensor(positions, device=device)
        return self._positions_on[device]

    def _splits(self, B: int) -> list[int]:
        """Rows to and from each rank: B, none to this one."""
        return [0 if r == self.ep_group.rank else B for r in range(self.ep_group.world_size)]

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
        row_TR = torch.where(wanted_TR, slot_TR, B - 1) + B * self._positions(device)

        # One buffer of 2R - 1 blocks: [blocks for the other ranks | received blocks | own block]; the experts
        # read the last R. Own rows go to the last block: R - 1 blocks past their position R - 1.
        own = (row_TR >= (R - 1) * B) * ((R - 1) * B)
        send_row_TR = row_TR + own
        x_buf = scatter_rows(hidden_states, send_row_TR, hidden_states.new_empty((2 * R - 1) * B, H))
        # ids travel as fp32 beside the weights (exact below 2^24): one collective for both; -1 ids mark rows
        # that hold no token for the receiver: the unused rows, and the dump rows (any token lands there).
        routing_buf = torch.full(((2 * R - 1) * B, 2 * K), -1.0, dtype=torch.float32, device=device)
        scatter_rows(torch.cat([topk_ids.float(), topk_weights.float()], dim=1), send_row_TR, routing_buf)
        routing_buf.view(2 * R - 1, B, 2 * K)[:, B - 1] = -1.0
        sent, received = slice(0, (R - 1) * B), slice((R - 1) * B, (2 * R - 2) * B)
        splits = self._splits(B)
        _, x_work = group.all_to_all_single(x_buf[sent], splits, splits, async_op=True, out=x_buf[received])
        _, routing_work = group.all_to_all_single(
            routing_buf[sent], splits, splits, async_op=True, out=routing_buf[received]
        )

        def finish():
            routing_MK2 = routing_buf[(R - 1) * B :]
            ids_MK = to_local_ids(routing_MK2[:, :K].long(), expert_map)
            return DispatchResult(x_buf[(R - 1) * B :], ids_MK, routing_MK2[:, K:], AllToAllMetadata(row_TR))

        return Pending([x_work, routing_work], finish)

    def combine_async(self, expert_output, metadata: AllToAllMetadata):
        R = metadata.row_TR.shape[1]
        B = expert_output.shape[0] // R
        splits = self._splits(B)
        # [partials from the other ranks | this rank's own partials]: the rows row_TR names.
        partial = torch.empty_like(expert_output)
        _, work = self.ep_group.all_to_all_single(
            expert_output[: (R - 1) * B], splits, splits, async_op=True, out=partial[: (R - 1) * B]
        )
        partial[(R - 1) * B :].copy_(expert_output[(R - 1) * B :])

        # In rank order, fp32, one cast; rows a rank did not get are its dump row: exact zeros.
        return Pending([work], lambda: gather_sum(partial, metadata.row_TR))
