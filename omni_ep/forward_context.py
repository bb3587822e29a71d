"""What one forward pass knows about every rank without asking them: the token bound of the MoE dispatch.

    with set_forward_context(max_tokens_across_ep=8194):
        velocity = transformer(...)

The pipeline knows, before a denoising step, how many tokens each rank runs through the MoE layers (it exchanges
the sequence lengths once per generation). Given that bound, dispatch sizes its buffers without a host
synchronisation inside the step, so the step can be captured as a CUDA graph. Without a context, dispatch asks
the other ranks (one small collective and a host sync per layer).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class ForwardContext:
    max_tokens_across_ep: int | None = None  # the most tokens any EP rank feeds one MoE layer in this pass


_CONTEXT: contextvars.ContextVar[ForwardContext] = contextvars.ContextVar("omni_ep_forward", default=ForwardContext())


def get_forward_context() -> ForwardContext:
    return _CONTEXT.get()


@contextlib.contextmanager
def set_forward_context(max_tokens_across_ep: int | None = None) -> Iterator[ForwardContext]:
    if max_tokens_across_ep is not None and max_tokens_across_ep < 0:
        raise ValueError(f"max_tokens_across_ep must be >= 0, got {max_tokens_across_ep}")
    token = _CONTEXT.set(ForwardContext(max_tokens_across_ep))
    try:
        yield _CONTEXT.get()
    finally:
        _CONTEXT.reset(token)
