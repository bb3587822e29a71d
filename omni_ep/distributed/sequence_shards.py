"""Split the tokens one pass runs over the sequence-parallel ranks: one contiguous, equal share per rank.

The pass runs sequence positions [start, stop). Each of the W ranks holds ceil((stop - start) / W) of them;
when W does not divide the count, padding positions [stop, padded_stop) are appended at the end (they belong to
the last rank(s)) and dropped when the shares are gathered again. Shares are in SP-rank order, so rank p holds
[start + p * shard_len, start + (p + 1) * shard_len).

    SequenceShards(start=0, stop=275, world_size=4)    # shard_len 69, padded_stop 276 (1 padding token)
        .bounds(0) == (0, 69)   .bounds(3) == (207, 276)
    SequenceShards(start=30, stop=287, world_size=2)   # a cached step: <timestep> + 256 image tokens
        .bounds(1) == (159, 288)

All of it is host arithmetic on Python ints: nothing here reads a device value.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def sequence_shard_len(num_tokens: int, world_size: int) -> int:
    """Tokens each of ``world_size`` ranks holds (padding included) when ``num_tokens`` are split."""
    return -(-num_tokens // world_size)


@dataclass(frozen=True)
class SequenceShards:
    start: int  # first sequence position of the pass
    stop: int  # one past its last real token
    world_size: int

    def __post_init__(self):
        if not 0 <= self.start <= self.stop:
            raise ValueError(
                f"a pass runs positions [start, stop) with 0 <= start <= stop, got [{self.start}, {self.stop})"
            )
        if self.world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {self.world_size}")

    @property
    def shard_len(self) -> int:
        return sequence_shard_len(self.stop - self.start, self.world_size)

    @property
    def padded_stop(self) -> int:
        return self.start + self.shard_len * self.world_size

    @property
    def padding(self) -> int:
        return self.padded_stop - self.stop

    def bounds(self, rank: int) -> tuple[int, int]:
        """[first, last + 1) sequence positions of ``rank``'s share (may run into the padding)."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank must be in [0, {self.world_size}), got {rank}")
        first = self.start + rank * self.shard_len
        return first, first + self.shard_len

    def shard(self, x: torch.Tensor, rank: int, dim: int) -> torch.Tensor:
        """x holds the pass's stop - start positions along ``dim``: ``rank``'s share of them, zero-padded."""
        if x.shape[dim] != self.stop - self.start:
            raise ValueError(f"dim {dim} of {tuple(x.shape)} should hold the pass's {self.stop - self.start} tokens")
        n = self.stop - self.start
        first, last = (b - self.start for b in self.bounds(rank))
        share = x.narrow(dim, min(first, n), max(0, min(last, n) - first))  # a share may be all padding
        missing = last - first - share.shape[dim]
        if missing == 0:
            return share
        dim = dim % x.dim()
        return F.pad(share, (0, 0) * (x.dim() - 1 - dim) + (0, missing))

    def unpad(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """The every-rank concatenation [padded_stop - start along dim] -> the pass's real stop - start tokens."""
        return x.narrow(dim, 0, self.stop - self.start)
