"""The cached denoising step as a CUDA graph: captured once per generation, replayed for every later step.

From step 1 on, a step runs the same kernels on tensors of the same shapes (the text prefix comes from the KV
cache), and nothing in it reads a value back to the host (the MoE dispatch has its token bound from the forward
context). Replaying one graph removes the launch gaps of several thousand kernels, which matters where a step is
launch-bound (small models and images); the pipeline uses it when ``pipe.cuda_graphs`` is True. The first cached
step runs eagerly (Triton compiles its kernels, libraries make their handles); the second is captured; every
later step copies its inputs (latents, timestep, and whatever else changes per step or per generation, such as
Instruct-Distil's r and guidance) into the graph's input buffers and replays. A value the step reads as a
Python number would be baked into the graph: everything that varies must come in as an input tensor.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

logger = logging.getLogger(__name__)


class CachedStepGraph:
    """step_fn(*inputs) -> velocity [B, C, h, w], inputs a fixed number of tensors of fixed shapes (latents
    [B, C, h, w], timestep [B], ...), run eagerly once, then captured.

    ``__call__`` returns a tensor that the next call overwrites (clone it to keep it). Where capture fails (a
    host sync inside the step, a collective library that cannot be captured) the step keeps running eagerly and
    ``error`` says why.
    """

    def __init__(self, step_fn: Callable[..., torch.Tensor], all_ranks_ok: Callable[[bool], bool] = lambda ok: ok):
        """all_ranks_ok(ok): whether every rank captured (a collective): a graph is kept only where all did,
        since ranks that replay a graph and ranks that run eagerly would wait for each other's collectives."""
        self.step_fn, self.all_ranks_ok = step_fn, all_ranks_ok
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.error: str | None = None
        self._inputs: tuple[torch.Tensor, ...] | None = None
        self._output: torch.Tensor | None = None

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.graph is not None:
            if len(inputs) != len(self._inputs):
                raise ValueError(f"the captured step takes {len(self._inputs)} input tensors, got {len(inputs)}")
            for buffer, value in zip(self._inputs, inputs):
                buffer.copy_(value)
            self.graph.replay()
            return self._output
        if self.calls == 1 or self.error is not None:
            return self.step_fn(*inputs)
        return self._capture(inputs)

    def _capture(self, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        buffers = tuple(x.clone() for x in inputs)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # the eager steps' cached blocks go back before the graph takes its own pool
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                output = self.step_fn(*buffers)
        except Exception as exc:  # noqa: BLE001 - any capture failure falls back to eager steps
            self.error = f"{type(exc).__name__}: {exc}"
        torch.cuda.synchronize()
        if not self.all_ranks_ok(self.error is None):
            self.error = self.error or "another rank could not capture the step"
        if self.error is not None:
            logger.warning("CUDA graph capture of the cached step failed; running it eagerly (%s)", self.error)
            return self.step_fn(*inputs)
        self.graph, self._inputs, self._output = graph, buffers, output
        graph.replay()
        return output
