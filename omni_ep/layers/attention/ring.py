"""Ring attention: queries stay on their rank, K/V blocks travel around the ring, partial results merge exactly.

Shape legend: B batch, N query heads, N_kv KV heads, L queries of this rank, L_k keys of one block, D head dim.

Each ring member holds the queries and the K/V of one contiguous block of the sequence. In W steps every member
sees every block: the block it holds goes to the next member while it works on it, and the previous member's
block arrives (``ring_blocks``). For each (query block, key block) pair the caller names the work as
``AttentionBlock``s: a run of queries over a run of keys, all of them visible or causal on a square diagonal.
Softmax over keys split into blocks is exact when every block returns its log-sum-exp and the partial outputs
are merged by it (``OnlineSoftmax``, the "online softmax" of flash attention): fp32 throughout the merge.
The block exchange runs under the profiler range ``PROFILE_RANGE`` (see benchmarks/profile_step.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from omni_ep.distributed.group_coordinator import GroupCoordinator

PROFILE_RANGE = "ring_pass"


@dataclass(frozen=True)
class AttentionBlock:
    """Queries [q_start, q_end) attend keys [k_start, k_end): every one of them, or with ``causal`` (a square
    block on the diagonal: as many queries as keys, at the same sequence positions) query q_start + i the keys
    k_start .. k_start + i. Positions may be local to a tensor (``shifted``), so q_start and k_start may differ."""

    q_start: int
    q_end: int
    k_start: int
    k_end: int
    causal: bool = False

    def __post_init__(self):
        if not (self.q_start < self.q_end and self.k_start < self.k_end):
            raise ValueError(f"{self}: empty query or key run")
        if self.causal and self.q_end - self.q_start != self.k_end - self.k_start:
            raise ValueError(f"{self}: a causal block must be square (a block of the diagonal)")

    def shifted(self, q_offset: int, k_offset: int) -> AttentionBlock:
        """The same block with q_offset subtracted from its query and k_offset from its key positions."""
        return AttentionBlock(self.q_start - q_offset, self.q_end - q_offset, self.k_start - k_offset,
                              self.k_end - k_offset, self.causal)


def attention_with_lse(
    q_BNLD: torch.Tensor, k_BKLD: torch.Tensor, v_BKLD: torch.Tensor, causal: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention with native GQA and its log-sum-exp: (out [B, N, L, D], lse [B, N, L] fp32).

    Fused kernels that return the log-sum-exp where there is one (CPU flash; CUDA flash for fp16/bf16), else the
    fp32 formula. ``causal`` only for square blocks (L == L_k), where every convention agrees."""
    if q_BNLD.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q_BNLD, k_BKLD, v_BKLD, is_causal=causal)
        return out, lse
    if q_BNLD.device.type == "cuda" and q_BNLD.dtype in (torch.float16, torch.bfloat16):
        group = q_BNLD.shape[1] // k_BKLD.shape[1]
        if group > 1:  # the aten entry point takes equal head counts
            k_BKLD, v_BKLD = k_BKLD.repeat_interleave(group, dim=1), v_BKLD.repeat_interleave(group, dim=1)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q_BNLD, k_BKLD, v_BKLD, 0.0, causal)[:2]
        return out, lse
    return _attention_with_lse_math(q_BNLD, k_BKLD, v_BKLD, causal)


def _attention_with_lse_math(q_BNLD, k_BKLD, v_BKLD, causal):
    B, N, L, D = q_BNLD.shape
    K, L_k = k_BKLD.shape[1], k_BKLD.shape[2]
    q_BKGLD = q_BNLD.float().reshape(B, K, N // K, L, D) * D**-0.5
    scores_BKGLL = q_BKGLD @ k_BKLD.float().unsqueeze(2).transpose(-1, -2)
    if causal:
        keep = torch.ones(L, L_k, dtype=torch.bool, device=q_BNLD.device).tril()
        scores_BKGLL = scores_BKGLL.masked_fill(~keep, float("-inf"))
    lse_BKGL = scores_BKGLL.logsumexp(-1)
    out_BKGLD = torch.exp(scores_BKGLL - lse_BKGL.unsqueeze(-1)) @ v_BKLD.float().unsqueeze(2)
    return out_BKGLD.reshape(B, N, L, D).to(q_BNLD.dtype), lse_BKGL.reshape(B, N, L)


class OnlineSoftmax:
    """Attention of queries q [B, N, L, D] over keys that come in blocks, merged exactly by log-sum-exp.

    ``attend(k, v, blocks)`` adds the keys of one block; ``result()`` is the output [B, L, N, D] in q's dtype.
    Every query must have attended at least one key by then."""

    def __init__(self, q_BNLD: torch.Tensor):
        self.q_BNLD = q_BNLD
        B, N, L, D = q_BNLD.shape
        self.out_BNLD = torch.zeros(B, N, L, D, dtype=torch.float32, device=q_BNLD.device)
        self.lse_BNL = torch.full((B, N, L), float("-inf"), dtype=torch.float32, device=q_BNLD.device)

    def attend(self, k_BKLD: torch.Tensor, v_BKLD: torch.Tensor, blocks: Iterable[AttentionBlock]) -> None:
        """Blocks in local positions: query rows of q, key rows of k and v."""
        for block in blocks:
            rows = slice(block.q_start, block.q_end)
            keys = slice(block.k_start, block.k_end)
            out, lse = attention_with_lse(self.q_BNLD[:, :, rows], k_BKLD[:, :, keys], v_BKLD[:, :, keys], block.causal)
            lse = lse.float()
            old_lse = self.lse_BNL[:, :, rows]
            new_lse = torch.logaddexp(old_lse, lse)  # finite: the block gives each of its rows at least one key
            merged = (self.out_BNLD[:, :, rows] * torch.exp(old_lse - new_lse).unsqueeze(-1)
                      + out.float() * torch.exp(lse - new_lse).unsqueeze(-1))
            self.out_BNLD[:, :, rows] = merged
            self.lse_BNL[:, :, rows] = new_lse

    def result(self) -> torch.Tensor:
        return self.out_BNLD.transpose(1, 2).to(self.q_BNLD.dtype)


def ring_blocks(x: torch.Tensor, group: GroupCoordinator) -> Iterator[tuple[int, torch.Tensor]]:
    """(source member, its block) for every member of the ring, this rank's own first, then the previous
    member's, and so on. While the caller works on one block the next one is already in flight. Every member
    must hold a block of the same shape and dtype."""
    world_size = group.world_size
    for step in range(world_size):
        in_flight = None
        if step < world_size - 1:
            with torch.profiler.record_function(PROFILE_RANGE):
                in_flight = group.ring_shift(x, async_op=True)
        yield (group.rank - step) % world_size, x
        if in_flight is not None:
            x, work = in_flight
            with torch.profiler.record_function(PROFILE_RANGE):
                work.wait()
