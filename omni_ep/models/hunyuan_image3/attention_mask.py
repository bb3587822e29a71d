"""Attention pattern of HunyuanImage-3.0: causal, plus full attention inside every image block.

Shape legend: S_kv keys (the sequence up to the last query), S_q = S_kv - query_start queries.
Text never sees a later image; image tokens see all earlier tokens and each other.

The model never builds the dense mask: ``attention_segments`` cuts the queries into runs that each attend a
key prefix with no mask (an image block: every key up to the block's end) or causally (text). On a cached
denoising step that is one key prefix for the <timestep> row and one for the image, two mask-free attention
calls. ``build_attention_mask`` (True = attend) is the pattern written out, against which the segments are
tested. ``segment_blocks`` cuts the pattern of a block of queries over a block of keys into mask-free pieces
(for ring attention, where each rank holds one block of the sequence).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from omni_ep.layers.attention.ring import AttentionBlock


@dataclass(frozen=True)
class AttentionSegment:
    """Queries [q_start, q_end) of the sequence attend keys [0, kv_end): all of them, or with ``causal`` query i
    only keys [0, i] (then kv_end == q_end)."""

    q_start: int
    q_end: int
    kv_end: int
    causal: bool


def _check_image_slices(seq_len: int, image_slices: Sequence[tuple[int, int]]) -> None:
    for start, end in image_slices:
        if not 0 <= start < end <= seq_len:
            raise ValueError(
                f"image slice ({start}, {end}) must satisfy 0 <= start < end <= seq_len={seq_len}; "
                "slices are (start, end) token ranges with end exclusive"
            )


def attention_segments(
    seq_len: int, image_slices: Sequence[tuple[int, int]], query_start: int = 0
) -> tuple[AttentionSegment, ...]:
    """The queries [query_start, seq_len) cut into runs: each image block (the part of it at or after
    query_start) attends keys [0, block end); each text run between blocks attends causally. A one-token text
    run is a mask-free prefix too (it sees every key up to itself)."""
    if not 0 <= query_start <= seq_len:
        raise ValueError(f"query_start must lie in [0, seq_len={seq_len}], got {query_start}")
    _check_image_slices(seq_len, image_slices)
    segments, q = [], query_start
    for start, end in sorted(image_slices) + [(seq_len, seq_len)]:
        if q < start:  # text before this block
            causal = start - q > 1
            segments.append(AttentionSegment(q, start, start, causal))
        if max(q, start) < end:
            segments.append(AttentionSegment(max(q, start), end, end, False))
        q = max(q, end)
    return tuple(segments)


def segment_blocks(
    segments: Sequence[AttentionSegment], queries: tuple[int, int], keys: tuple[int, int]
) -> tuple[AttentionBlock, ...]:
    """Queries [q0, q1) over keys [k0, k1) (sequence positions) under the segments' pattern, as blocks that need
    no mask: a query run over the keys all of its queries see, and for causal text the square diagonal block
    (query i sees keys up to i) plus the keys before it (seen by all) and the queries after it (which see all of
    it). Queries outside the segments, and queries that see no key of the run, get no block."""
    (q0, q1), (k0, k1) = queries, keys
    blocks = []
    for seg in segments:
        qa, qb = max(seg.q_start, q0), min(seg.q_end, q1)
        if qa >= qb:
            continue
        if not seg.causal:
            if min(k1, seg.kv_end) > k0:
                blocks.append(AttentionBlock(qa, qb, k0, min(k1, seg.kv_end)))
            continue
        if min(k1, qa) > k0:  # keys before the first query: every query sees them
            blocks.append(AttentionBlock(qa, qb, k0, min(k1, qa)))
        d0, d1 = max(k0, qa), min(k1, qb)  # keys among the queries' own positions
        if d0 < d1:
            blocks.append(AttentionBlock(d0, d1, d0, d1, causal=True))
            if d1 < qb:  # queries past the key run see all of it
                blocks.append(AttentionBlock(d1, qb, d0, d1))
    return tuple(blocks)


def build_attention_mask(
    seq_len: int,
    image_slices: Sequence[tuple[int, int]],
    device: torch.device | str | None = None,
    query_start: int = 0,
) -> torch.Tensor:
    """bool [S_q, S_kv] with S_kv = seq_len and S_q = seq_len - query_start.

    image_slices: (start, end) token ranges, end exclusive, each inside [0, seq_len).
    query_start > 0 is the KV-cache case: queries are tokens [query_start, seq_len), keys are all
    seq_len tokens (cached prefix first). Row i of the result is the mask row of token query_start + i.
    """
    if not 0 <= query_start <= seq_len:
        raise ValueError(f"query_start must lie in [0, seq_len={seq_len}], got {query_start}")
    q_idx = torch.arange(query_start, seq_len, device=device)
    k_idx = torch.arange(seq_len, device=device)
    mask_QK = k_idx.unsqueeze(0) <= q_idx.unsqueeze(1)
    _check_image_slices(seq_len, image_slices)
    for start, end in image_slices:
        in_q = (q_idx >= start) & (q_idx < end)
        in_k = (k_idx >= start) & (k_idx < end)
        mask_QK |= in_q.unsqueeze(1) & in_k.unsqueeze(0)
    return mask_QK
