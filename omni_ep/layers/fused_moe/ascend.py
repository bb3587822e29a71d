"""FusedMoE on Ascend NPUs (UNTESTED on hardware; see experts/npu_experts.py)."""

from omni_ep.layers.fused_moe.layer import FusedMoE


class AscendFusedMoE(FusedMoE):
    preferred_experts_backends = ("npu",)
