from omni_ep.platforms.interface import OmniPlatform


class CpuOmniPlatform(OmniPlatform):
    """CPU: the torch reference implementations, gloo for communication."""

    name = "cpu"
    device_type = "cpu"
    dist_backend = "gloo"
    diffusion_ops = {"hunyuan_fused_moe": "omni_ep.layers.fused_moe.layer.FusedMoE"}
