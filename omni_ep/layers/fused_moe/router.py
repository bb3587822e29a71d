"""HunyuanImage-3.0 routing: fp32 logits, softmax over ALL experts, top-k, renormalise.

Shape legend: T tokens, E experts, K top-k.
"""

from __future__ import annotations

import torch

from omni_ep.layers.fused_ops import router_topk


def select_experts(
    router_logits: torch.Tensor,  # [T, E], computed in fp32 by a replicated gate
    top_k: int,
    renormalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (topk_weights [T, K] fp32, topk_ids [T, K] int64 global expert ids); among equal probabilities the
    lower expert id comes first. One fused kernel on GPUs (omni_ep.layers.fused_ops.router_topk)."""
    return router_topk(router_logits.float(), top_k, renormalize)
