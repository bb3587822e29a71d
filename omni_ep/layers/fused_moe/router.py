"""HunyuanImage-3.0 routing: fp32 logits, softmax over ALL experts, top-k, renormalise.

Shape legend: T tokens, E experts, K top-k.
"""

from __future__ import annotations

import torch


def select_experts(
    router_logits: torch.Tensor,  # [T, E], computed in fp32 by a replicated gate
    top_k: int,
    renormalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (topk_weights [T, K] fp32, topk_ids [T, K] int64 global expert ids)."""
    probs_TE = torch.softmax(router_logits.float(), dim=-1)
    topk_weights_TK, topk_ids_TK = torch.topk(probs_TE, top_k, dim=-1)
    if renormalize:
        topk_weights_TK = topk_weights_TK / topk_weights_TK.sum(dim=-1, keepdim=True)
    return topk_weights_TK, topk_ids_TK
