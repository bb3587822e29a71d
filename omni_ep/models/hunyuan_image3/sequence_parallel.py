"""Sequence parallel (SP) for the HunyuanImage-3.0 transformer: Ulysses inside, ring outside (USP, as xDiT does).

Shape legend: B batch, S tokens of the pass, L = ceil(S / SP) tokens of this rank's share, H hidden size,
N / N_kv query / KV heads of this rank (after TP), n / n_kv after the ulysses exchange, D head dim.

What each SP rank holds (SP = U x R, SP rank = ulysses rank + U * ring rank, the order of the rank layout):
- A contiguous share of the tokens the pass runs (``SequenceShards``: step 0 the whole sequence, the text
  prefix on the rank(s) whose share contains it; cached steps ``[<timestep>, image tokens]``), padded at the
  end to a multiple of SP. The members of one ulysses group hold consecutive shares: one contiguous ring block
  of U * L tokens per ring rank.
- The embeddings (computed whole, then cut), RoPE tables, norms, projections and the MoE of its share: each
  rank dispatches its own, distinct tokens across the EP group.
- Attention (``HunyuanImage3SequenceParallelAttention``): the ulysses all-to-all gives n heads of the ring
  block; ring attention runs the block's queries over every ring block's keys (and the cached prefix); the
  all-to-all back returns the share's tokens with all heads.
- After the layers the shares are all-gathered over SP and the padding dropped (``gather_pass``): the final
  layer's convolutions and group norms need the whole latent grid, so it runs on the whole image on every SP
  rank, and every SP rank holds the whole velocity (no gather of it after the model).

Padding tokens (positions stop .. padded_stop) have zero embeddings and attend key 0 only (finite, dropped).
No real query attends them: a real query's keys end at its own position or at its image block's end, both
before ``stop``.

Text-prefix KV cache: every rank stores the WHOLE prefix of the n_kv heads its attention runs. With ring
degree 1 that is what the ulysses exchange gives on step 0; with ring degree > 1 every ring block passes
through every ring rank on step 0, so each keeps the prefix parts as they go by. On the cached steps only the
ring blocks of ``[<timestep>, image]`` travel; the prefix is attended locally.

Everything here is host arithmetic on Python ints plus collectives of fixed shapes: the cached step stays free
of host syncs (graph-capturable).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from omni_ep.distributed import get_ring_group, get_sp_group, get_tp_group, get_ulysses_group
from omni_ep.distributed.group_coordinator import GroupCoordinator
from omni_ep.distributed.sequence_shards import SequenceShards
from omni_ep.layers.attention.ring import OnlineSoftmax, ring_blocks
from omni_ep.layers.attention.ulysses import check_ulysses_heads, heads_to_sequence, sequence_to_heads
from omni_ep.models.hunyuan_image3.attention import (
    HunyuanImage3Attention,
    HunyuanImage3KVCache,
    segmented_attention,
)
from omni_ep.models.hunyuan_image3.attention_mask import AttentionSegment, segment_blocks
from omni_ep.models.hunyuan_image3.configuration import HunyuanImage3Config


def apply_sequence_parallel(model: nn.Module, config: HunyuanImage3Config) -> None:
    """Give every attention layer of ``model`` the sequence-parallel core when the SP group has > 1 rank.
    Raises (on every rank alike, before any collective) when the heads do not split over TP x ulysses."""
    if get_sp_group().world_size == 1:
        return
    check_ulysses_heads(config.num_attention_heads, config.num_key_value_heads, get_ulysses_group().world_size,
                        get_tp_group().world_size)
    for module in model.modules():
        if isinstance(module, HunyuanImage3Attention):
            module.sequence_parallel = HunyuanImage3SequenceParallelAttention(module.layer_idx)


def split_pass(
    shards: SequenceShards,
    sp_rank: int,
    x_BSH: torch.Tensor,
    cos_SD: torch.Tensor,
    sin_SD: torch.Tensor,
    segments: Sequence[AttentionSegment],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[AttentionSegment, ...]]:
    """SP rank ``sp_rank``'s share of the pass: x [B, L, H], cos, sin [L, D], and the segments with the padding."""
    segments = pad_segments(shards, segments)
    return (shards.shard(x_BSH, sp_rank, 1), shards.shard(cos_SD, sp_rank, 0), shards.shard(sin_SD, sp_rank, 0),
            segments)


def pad_segments(shards: SequenceShards, segments: Sequence[AttentionSegment]) -> tuple[AttentionSegment, ...]:
    """The pass's segments plus one for the padding queries, which attend key 0 only (finite, never read)."""
    if not shards.padding:
        return tuple(segments)
    return (*segments, AttentionSegment(shards.stop, shards.padded_stop, 1, False))


def gather_pass(shards: SequenceShards, sp_group: GroupCoordinator, x_BLH: torch.Tensor) -> torch.Tensor:
    """Every SP rank's share, in order, padding dropped: [B, L, H] -> [B, S, H]."""
    return shards.unpad(sp_group.all_gather(x_BLH, dim=1), dim=1)


class HunyuanImage3SequenceParallelAttention:
    """Attention of this rank's share: q [B, N, L, D], k, v [B, N_kv, L, D] -> out [B, L, N, D], exactly the
    single process's rows of those tokens. ``segments`` cover the whole pass, padding included."""

    def __init__(self, layer_idx: int):
        self.layer_idx = layer_idx
        self.ulysses, self.ring = get_ulysses_group(), get_ring_group()

    def __call__(
        self,
        q_BNLD: torch.Tensor,
        k_BKLD: torch.Tensor,
        v_BKLD: torch.Tensor,
        segments: Sequence[AttentionSegment],
        kv_cache: HunyuanImage3KVCache | None = None,
    ) -> torch.Tensor:
        q_BnSD, k_BkSD, v_BkSD = sequence_to_heads(q_BNLD, k_BKLD, v_BKLD, self.ulysses)  # S: the ring block
        if self.ring.world_size == 1:  # the block is the whole pass: as one process does
            if kv_cache is not None:
                k_BkSD, v_BkSD = kv_cache.store_or_extend(self.layer_idx, k_BkSD, v_BkSD)
            out_BSnD = segmented_attention(q_BnSD, k_BkSD, v_BkSD, segments)
        else:
            out_BSnD = self._ring_attention(q_BnSD, k_BkSD, v_BkSD, segments, kv_cache)
        return heads_to_sequence(out_BSnD, self.ulysses)

    def _ring_attention(self, q_BnSD, k_BkSD, v_BkSD, segments, kv_cache) -> torch.Tensor:
        """This ring block's queries over the cached prefix (if any) and every ring block: [B, S, n, D]."""
        pass_start, block_len = segments[0].q_start, q_BnSD.shape[2]
        q_first = pass_start + self.ring.rank * block_len
        queries = (q_first, q_first + block_len)
        softmax = OnlineSoftmax(q_BnSD)
        prefix = None if kv_cache is None else kv_cache.prefix(self.layer_idx, q_BnSD.shape[0])
        if prefix is not None:  # a cached step: the prefix is local
            k_prefix, v_prefix = prefix
            blocks = segment_blocks(segments, queries, (0, k_prefix.shape[2]))
            softmax.attend(k_prefix, v_prefix, [b.shifted(q_first, 0) for b in blocks])
        filling = kv_cache is not None and prefix is None
        prefix_parts = []
        for source, kv_2BkSD in ring_blocks(torch.stack([k_BkSD, v_BkSD]), self.ring):
            k_first = pass_start + source * block_len
            blocks = segment_blocks(segments, queries, (k_first, k_first + block_len))
            softmax.attend(kv_2BkSD[0], kv_2BkSD[1], [b.shifted(q_first, k_first) for b in blocks])
            if filling and k_first < kv_cache.prefix_len:  # step 0 starts at position 0
                prefix_parts.append((source, kv_2BkSD[:, :, :, : kv_cache.prefix_len - k_first]))
        if filling:
            kv_2BkPD = torch.cat([part for _, part in sorted(prefix_parts, key=lambda p: p[0])], dim=3)
            kv_cache.store(self.layer_idx, kv_2BkPD[0], kv_2BkPD[1])
        return softmax.result()
