"""Measuring a pipeline run: when each denoising step ended, and peak memory."""

from __future__ import annotations

import resource
import time

import torch


class StepTimer:
    """A ``callback_on_step_end`` that records the (device-synchronised) end time of every step.

        timer = StepTimer(device); timer.start(); pipe(..., callback_on_step_end=timer); timer.step_seconds
    """

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.started = time.perf_counter()
        self.ends: list[float] = []
        self.steps: list[int] = []  # the step index of each end (one run of 0..N-1 per generation)

    def start(self) -> None:
        self.started, self.ends, self.steps = time.perf_counter(), [], []

    def __call__(self, pipeline, step, timestep, tensors):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.ends.append(time.perf_counter())
        self.steps.append(step)
        return tensors

    @property
    def step_seconds(self) -> list[float]:
        """Duration of each step; the first includes the call's set-up (tokenizing, latents, scheduler)."""
        return [b - a for a, b in zip([self.started] + self.ends[:-1], self.ends)]

    @property
    def first_step_seconds(self) -> list[float]:
        """Step 0 of each generation (the whole sequence, and what came before it since the last step)."""
        return [s for s, step in zip(self.step_seconds, self.steps) if step == 0]

    @property
    def later_step_seconds(self) -> list[float]:
        """Every cached step (1..N-1) of every generation."""
        return [s for s, step in zip(self.step_seconds, self.steps) if step > 0]


def peak_memory_gib(device: torch.device) -> float:
    """Peak GPU memory allocated by torch on CUDA; the process's peak resident set on CPU."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux
