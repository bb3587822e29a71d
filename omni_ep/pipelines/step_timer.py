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

    def start(self) -> None:
        self.started, self.ends = time.perf_counter(), []

    def __call__(self, pipeline, step, timestep, tensors):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.ends.append(time.perf_counter())
        return tensors

    @property
    def step_seconds(self) -> list[float]:
        """Duration of each step; the first includes the call's set-up (tokenizing, latents, scheduler)."""
        return [b - a for a, b in zip([self.started] + self.ends[:-1], self.ends)]


def peak_memory_gib(device: torch.device) -> float:
    """Peak GPU memory allocated by torch on CUDA; the process's peak resident set on CPU."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux
