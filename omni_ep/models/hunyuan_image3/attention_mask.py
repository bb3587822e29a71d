"""Attention mask of HunyuanImage-3.0: causal, plus full attention inside every image block.

Shape legend: S_kv keys (the sequence up to the last query), S_q = S_kv - query_start queries.
True = attend. Text never sees a later image; image tokens see all earlier tokens and each other.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


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
    for start, end in image_slices:
        if not 0 <= start < end <= seq_len:
            raise ValueError(
                f"image slice ({start}, {end}) must satisfy 0 <= start < end <= seq_len={seq_len}; "
                "slices are (start, end) token ranges with end exclusive"
            )
        in_q = (q_idx >= start) & (q_idx < end)
        in_k = (k_idx >= start) & (k_idx < end)
        mask_QK |= in_q.unsqueeze(1) & in_k.unsqueeze(0)
    return mask_QK
