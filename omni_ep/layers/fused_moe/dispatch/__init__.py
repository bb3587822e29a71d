"""Dispatch/combine backends by name (the --all2all-backend flag)."""

from omni_ep.layers.fused_moe.dispatch.all2all import AllToAllDispatcher
from omni_ep.layers.fused_moe.dispatch.allgather_reducescatter import AllGatherReduceScatterDispatcher
from omni_ep.layers.fused_moe.dispatch.base import DispatchResult, Dispatcher, LocalDispatcher

DISPATCHERS: dict[str, type[Dispatcher]] = {
    cls.name: cls for cls in (LocalDispatcher, AllGatherReduceScatterDispatcher, AllToAllDispatcher)
}


def get_dispatcher_cls(name: str) -> type[Dispatcher]:
    try:
        return DISPATCHERS[name]
    except KeyError:
        raise ValueError(f"unknown dispatch backend {name!r}; known: {', '.join(DISPATCHERS)}") from None


__all__ = ["DISPATCHERS", "DispatchResult", "Dispatcher", "LocalDispatcher", "get_dispatcher_cls"]
