"""Local-expert compute implementations by name. Implementations register lazily (by qualified name) so
that importing this package never imports triton or torch_npu."""

from __future__ import annotations

import torch

from omni_ep.layers.fused_moe.experts.base import LocalExperts
from omni_ep.utils import resolve_obj_by_qualname

LOCAL_EXPERTS: dict[str, str] = {
    "torch": "omni_ep.layers.fused_moe.experts.torch_experts.TorchExperts",
    "triton": "omni_ep.layers.fused_moe.experts.triton_experts.TritonExperts",
    "npu": "omni_ep.layers.fused_moe.experts.npu_experts.NpuExperts",
}


def get_local_experts_cls(name: str) -> type[LocalExperts]:
    if name not in LOCAL_EXPERTS:
        raise ValueError(f"unknown local-experts backend {name!r}; known: {', '.join(LOCAL_EXPERTS)}")
    return resolve_obj_by_qualname(LOCAL_EXPERTS[name])


def unsupported_reason(name: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """None when backend ``name`` runs on (device, dtype), else why not (import failures included)."""
    try:
        cls = get_local_experts_cls(name)
    except ImportError as exc:
        return f"{name} experts cannot be imported: {exc}"
    return cls.unsupported_reason(device, dtype)


__all__ = ["LOCAL_EXPERTS", "LocalExperts", "get_local_experts_cls", "unsupported_reason"]
