"""One process group seen from one rank: its rank, size, members, and the collectives the model uses.

A group of size 1 holds no torch process group; its collectives return their input unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from omni_ep.distributed.row_chunks import row_chunk

# torch >= 2.13 renamed the tensor-in/tensor-out collectives; older releases only have the old names.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@dataclass(frozen=True)
class GroupCoordinator:
    name: str
    rank: int  # rank of this process inside the group
    ranks: tuple[int, ...]  # global ranks of the members, in group-rank order
    group: dist.ProcessGroup | None

    @property
    def world_size(self) -> int:
        return len(self.ranks)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over the group, in place when possible; returns the summed tensor."""
        if self.world_size == 1:
            return x
        x = x.contiguous()
        dist.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = 0, async_op: bool = False):
        """Concatenate equal-shaped tensors of every member along ``dim``. With async_op: (out, work), out valid
        once work.wait() returned (on CUDA: once the current stream waited for it)."""
        if self.world_size == 1:
            return (x, None) if async_op else x
        x = x.movedim(dim, 0).contiguous()
        out = x.new_empty((self.world_size * x.shape[0],) + tuple(x.shape[1:]))
        work = _all_gather_single(out, x, group=self.group, async_op=async_op)
        out = out.movedim(0, dim)
        return (out, work) if async_op else out

    def all_gather_uneven(self, x: torch.Tensor, sizes: list[int], dim: int = 0) -> torch.Tensor:
        """Concatenate along ``dim`` the members' tensors, member r's of size sizes[r] there (equal elsewhere):
        each is padded to the largest size for one all-gather, and the padding dropped."""
        if self.world_size == 1:
            return x
        width = max(sizes)
        pad = [0, 0] * (x.dim() - 1 - dim % x.dim()) + [0, width - x.shape[dim]]
        gathered = self.all_gather(torch.nn.functional.pad(x, pad), dim)
        if all(size == width for size in sizes):
            return gathered
        return torch.cat([gathered.narrow(dim, r * width, size) for r, size in enumerate(sizes)], dim)

    def all_gather_row_chunks(self, x_CH: torch.Tensor, num_rows: int) -> torch.Tensor:
        """Join the members' row_chunk(num_rows, rank, world_size) chunks x_C... into all num_rows rows."""
        chunks = (row_chunk(num_rows, r, self.world_size) for r in range(self.world_size))
        return self.all_gather_uneven(x_CH, [end - start for start, end in chunks])

    def all_gather_object(self, obj) -> list:
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def reduce_scatter(self, x: torch.Tensor, async_op: bool = False):
        """Sum over the group, then keep this rank's equal chunk of dim 0 (async_op: as all_gather)."""
        if self.world_size == 1:
            return (x, None) if async_op else x
        x = x.contiguous()
        out = x.new_empty((x.shape[0] // self.world_size,) + tuple(x.shape[1:]))
        work = _reduce_scatter_single(out, x, group=self.group, async_op=async_op)
        return (out, work) if async_op else out

    def reduce_scatter_row_chunks(self, x_TH: torch.Tensor) -> torch.Tensor:
        """Sum x [T, ...] over the group and keep this rank's row_chunk(T, rank, world_size) rows [C, ...]. Uneven
        chunks are padded to the largest for one reduce-scatter."""
        if self.world_size == 1:
            return x_TH
        T = x_TH.shape[0]
        chunks = [row_chunk(T, r, self.world_size) for r in range(self.world_size)]
        width = max(end - start for start, end in chunks)
        if width == 0:
            return x_TH
        if T != width * self.world_size:
            padded = x_TH.new_zeros((self.world_size, width) + tuple(x_TH.shape[1:]))
            for r, (start, end) in enumerate(chunks):
                padded[r, : end - start] = x_TH[start:end]
            x_TH = padded.flatten(0, 1)
        start, end = chunks[self.rank]
        return self.reduce_scatter(x_TH)[: end - start]

    def all_to_all_single(
        self,
        x: torch.Tensor,
        output_split_sizes: list[int],
        input_split_sizes: list[int],
        async_op: bool = False,
        out: torch.Tensor | None = None,
    ):
        """Send rows input_split_sizes[r] to rank r; receive output_split_sizes[r] rows from rank r, into ``out``
        when given (async_op: as all_gather)."""
        if self.world_size == 1:
            result = x if out is None else out.copy_(x)
            return (result, None) if async_op else result
        if out is None:
            out = x.new_empty((sum(output_split_sizes),) + tuple(x.shape[1:]))
        work = dist.all_to_all_single(
            out, x.contiguous(), output_split_sizes, input_split_sizes, group=self.group, async_op=async_op
        )
        return (out, work) if async_op else out

    def ring_shift(self, x: torch.Tensor, async_op: bool = False):
        """Send x to the next member (group rank + 1, the last to the first) and receive the previous member's
        tensor of the same shape and dtype (async_op: as all_gather)."""
        if self.world_size == 1:
            return (x, None) if async_op else x
        x = x.contiguous()
        out = torch.empty_like(x)
        next_rank = self.ranks[(self.rank + 1) % self.world_size]
        prev_rank = self.ranks[(self.rank - 1) % self.world_size]
        works = dist.batch_isend_irecv([dist.P2POp(dist.isend, x, next_rank, self.group),
                                        dist.P2POp(dist.irecv, out, prev_rank, self.group)])
        work = _AllWorks(works, keep_alive=x)
        if async_op:
            return out, work
        work.wait()
        return out

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier(group=self.group)


class _AllWorks:
    """One wait() for several pending point-to-point operations; holds the send buffer until they finish."""

    def __init__(self, works: list, keep_alive: torch.Tensor):
        self.works, self.keep_alive = works, keep_alive

    def wait(self) -> None:
        for work in self.works:
            work.wait()
        self.keep_alive = None
