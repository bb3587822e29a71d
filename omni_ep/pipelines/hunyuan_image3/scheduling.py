"""Flow-matching Euler schedule of HunyuanImage-3.0 (SD3 shift 3.0).

sigmas = linspace(1, 0, N+1), shifted s -> shift*s / (1 + (shift-1)*s); timesteps = sigma * 1000;
x_next = x + v * (sigma_next - sigma). diffusers' FlowMatchEulerDiscreteScheduler reproduces this only when
given the unshifted sigmas explicitly; its plain set_timesteps(N) spaces them differently.

Instruct-Distil conditions each step on two more values, both fed to timestep-style embedders:
- MeanFlow ``r``: step i also gets r_i = 1000 * sigma_{i+1}, the next step's timestep (0 on the last step);
  the update stays plain Euler with the model output (the network predicts the mean velocity over the step).
- distilled guidance ``G``: the guidance scale g enters the model as G = bf16(1000 * g) (2.5 -> 2496), the
  same on every step; there is no uncond pass.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:  # diffusers takes seconds to import: variant.py (and the early checks) use this module without it
    from diffusers import FlowMatchEulerDiscreteScheduler


def flow_match_sigmas(num_inference_steps: int, shift: float = 3.0) -> torch.Tensor:
    """[N+1] fp32 shifted sigmas, from 1 down to 0 (the last entry is the final, clean sigma 0)."""
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
    sigmas = torch.linspace(1.0, 0.0, num_inference_steps + 1, dtype=torch.float64)
    return (shift * sigmas / (1 + (shift - 1) * sigmas)).float()


def make_scheduler(
    num_inference_steps: int,
    shift: float = 3.0,
    device: torch.device | str | None = None,
    sigmas: list[float] | None = None,
) -> tuple[FlowMatchEulerDiscreteScheduler, torch.Tensor]:
    """(scheduler ready to step, timesteps [N] = shifted sigma * 1000). ``sigmas``: N unshifted sigmas in (0, 1],
    decreasing, in place of linspace(1, 0, N+1)[:-1] (as diffusers' pipelines take them; the shift still applies)."""
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
    if sigmas is not None and len(sigmas) != num_inference_steps:
        raise ValueError(f"{len(sigmas)} sigmas for num_inference_steps={num_inference_steps}")
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    unshifted = np.linspace(1.0, 0.0, num_inference_steps + 1)[:-1] if sigmas is None else np.asarray(sigmas, float)
    scheduler.set_timesteps(sigmas=unshifted, device=device)
    return scheduler, scheduler.timesteps


def meanflow_timesteps_r(timesteps: torch.Tensor) -> torch.Tensor:
    """[N] r of every step: the next step's timestep, 0 after the last (timesteps [N] = sigma * 1000)."""
    return torch.cat([timesteps[1:], timesteps.new_zeros(1)])


def distilled_guidance(guidance_scale: float) -> torch.Tensor:
    """The guidance value a cfg-distilled model is fed: 1000 * g rounded to bfloat16 (as the official pipeline
    creates it), returned as a 0-d fp32 tensor."""
    return torch.tensor(1000.0 * guidance_scale, dtype=torch.bfloat16).float()
