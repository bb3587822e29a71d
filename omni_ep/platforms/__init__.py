"""The platform registry. ``current_omni_platform`` is resolved on first use:

1. the environment variable ``OMNI_EP_PLATFORM`` (a built-in name or an out-of-tree plugin's name);
2. out-of-tree plugins: entry points in the group ``omni_ep.platform_plugins``, each a function that returns
   the qualified name of its platform class when that platform is usable here, else None;
3. built-ins: CUDA when available, else an Ascend NPU when torch_npu imports and sees devices, else CPU.
"""

from __future__ import annotations

import os
from importlib.metadata import entry_points

from omni_ep.platforms.interface import OmniPlatform
from omni_ep.utils import resolve_obj_by_qualname

PLUGIN_GROUP = "omni_ep.platform_plugins"
BUILTIN_PLATFORMS = {
    "cuda": "omni_ep.platforms.cuda.CudaOmniPlatform",
    "npu": "omni_ep.platforms.npu.NpuOmniPlatform",
    "cpu": "omni_ep.platforms.cpu.CpuOmniPlatform",
}

_current: OmniPlatform | None = None


def _plugin_platforms() -> dict[str, str]:
    """name -> platform qualname of every installed plugin that reports its platform usable."""
    found = {}
    for ep in entry_points(group=PLUGIN_GROUP):
        qualname = ep.load()()
        if qualname:
            found[ep.name] = qualname
    return found


def resolve_platform_qualname() -> str:
    forced = os.environ.get("OMNI_EP_PLATFORM")
    if forced:
        if forced in BUILTIN_PLATFORMS:
            return BUILTIN_PLATFORMS[forced]
        plugins = _plugin_platforms()
        if forced in plugins:
            return plugins[forced]
        raise ValueError(
            f"OMNI_EP_PLATFORM={forced!r} names no platform; built-in: {', '.join(BUILTIN_PLATFORMS)}; "
            f"usable plugins: {', '.join(plugins) or 'none'}"
        )
    plugins = _plugin_platforms()
    if len(plugins) > 1:
        raise RuntimeError(f"several platform plugins are usable ({', '.join(plugins)}); choose one with OMNI_EP_PLATFORM")
    if plugins:
        return next(iter(plugins.values()))
    for name in ("cuda", "npu"):
        if resolve_obj_by_qualname(BUILTIN_PLATFORMS[name]).is_available():
            return BUILTIN_PLATFORMS[name]
    return BUILTIN_PLATFORMS["cpu"]


def get_current_platform() -> OmniPlatform:
    global _current
    if _current is None:
        _current = resolve_obj_by_qualname(resolve_platform_qualname())()
    return _current


def reset_current_platform() -> None:
    """Forget the resolved platform (the next use resolves again)."""
    global _current
    _current = None


def __getattr__(name: str):
    if name == "current_omni_platform":
        return get_current_platform()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["BUILTIN_PLATFORMS", "OmniPlatform", "current_omni_platform", "get_current_platform", "reset_current_platform"]
