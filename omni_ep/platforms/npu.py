"""Ascend NPUs through torch_npu (UNTESTED on hardware: this project has no NPU)."""

import torch

from omni_ep.platforms.interface import OmniPlatform


class NpuOmniPlatform(OmniPlatform):
    name = "npu"
    device_type = "npu"
    dist_backend = "hccl"
    diffusion_ops = {"hunyuan_fused_moe": "omni_ep.layers.fused_moe.ascend.AscendFusedMoE"}

    @classmethod
    def is_available(cls) -> bool:
        try:
            import torch_npu  # noqa: F401
        except ImportError:
            return False
        return torch.npu.is_available() and torch.npu.device_count() > 0

    def _prepare_op(self, op_name: str) -> None:
        try:
            import torch_npu  # noqa: F401
        except ImportError as exc:
            raise ImportError(f"the NPU platform's {op_name} needs torch_npu, which is not installed") from exc
