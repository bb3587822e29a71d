"""The routed-expert layer and its two halves: dispatch/combine (communication) and local experts (compute)."""

from omni_ep.layers.fused_moe.layer import FusedMoE
from omni_ep.layers.fused_moe.router import select_experts

__all__ = ["FusedMoE", "select_experts"]
