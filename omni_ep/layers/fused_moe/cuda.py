"""FusedMoE on CUDA GPUs: the Triton fused-MoE kernels, with the torch grouped-matmul path as fallback."""

from omni_ep.layers.fused_moe.layer import FusedMoE


class CudaFusedMoE(FusedMoE):
    preferred_experts_backends = ("triton", "torch")
