import torch

from omni_ep.platforms.interface import OmniPlatform


class CudaOmniPlatform(OmniPlatform):
    """NVIDIA GPUs: Triton fused-MoE kernels (torch grouped matmul as fallback), NCCL."""

    name = "cuda"
    device_type = "cuda"
    dist_backend = "nccl"
    diffusion_ops = {"hunyuan_fused_moe": "omni_ep.layers.fused_moe.cuda.CudaFusedMoE"}

    @classmethod
    def is_available(cls) -> bool:
        return torch.cuda.is_available()
