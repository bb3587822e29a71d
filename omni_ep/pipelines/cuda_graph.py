"""The cached denoising step as a CUDA graph: captured once per generation, replayed for every later step.

From step 1 on, a step runs the same kernels on tensors of the same shapes (the text prefix comes from the KV
cache), and nothing in it reads a value back to the host (the MoE dispatch has its token bound from the forward
context). Replaying one graph removes the launch gaps of several thousand kernels. The first cached step runs
eagerly (Triton compiles its kernels, libraries make their handles); the second is captured; every later step
copies its latents and timestep into the graph's input buffers and replays.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

logger = logging.getLogger(__name__)


class CachedStepGraph:
    """step_fn(latents [B, C, h, w], timestep [B]) -> velocity [B, C, h, w], run eagerly once, then captured.

    ``__call__`` returns a tensor that the next call overwrites (clone it to keep it). Where capture fails (a
    host sync inside the step, a collective library that cannot be captured) the step keeps running eagerly and
    ``error`` says why.
    """

    def __init__(self, step_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 all_ranks_ok: Callable[[bool], bool] = lambda ok: ok):
        """all_ranks_ok(ok): whether every rank captured (a collective): a graph is kept only where all did,
        since ranks that replay a graph and ranks that run eagerly would wait for each other's collectives."""
        self.step_fn, self.all_ranks_ok = step_fn, all_ranks_ok
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.error: str | None = None
        self._inputs: tuple[torch.Tensor, torch.Tensor] | None = None
        self._output: torch.Tensor | None = None

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def __call__(self, latents: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.graph is not None:
            self._inputs[0].copy_(latents)
            self._inputs[1].copy_(timestep)
            self.graph.replay()
            return self._output
        if self.calls == 1 or self.error is not None:
            return self.step_fn(latents, timestep)
        return self._capture(latents, timestep)

    def _capture(self, latents: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        inputs = (latents.clone(), timestep.clone())
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # the eager steps' cached blocks go back before the graph takes its own pool
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                output = self.step_fn(*inputs)
        except Exception as exc:  # noqa: BLE001 - any capture failure falls back to eager steps
            self.error = f"{type(exc).__name__}: {exc}"
        torch.cuda.synchronize()
        if not self.all_ranks_ok(self.error is None):
            self.error = self.error or "another rank could not capture the step"
        if self.error is not None:
            logger.warning("CUDA graph capture of the cached step failed; running it eagerly (%s)", self.error)
            return self.step_fn(latents, timestep)
        self.graph, self._inputs, self._output = graph, inputs, output
        graph.replay()
        return output
