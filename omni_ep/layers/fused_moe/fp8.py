"""FP8 experts (opt-in, ``quantization="fp8"``): e4m3 weights with one scale per output channel, activations
quantized per row on the fly. Not exact: the expert GEMMs read 8-bit operands (the rest of the model stays in the
activation dtype), for twice the tensor-core rate of bf16 on Hopper and half the expert memory.

    w[e, n, :]  ~  w_q[e, n, :] * w_scale[e, n]          at load: scale = max|w[e, n, :]| / 448
    x[m, :]     ~  x_q[m, :] * x_scale[m]                 per call (x before gate_up, h before down)
    x @ w[e].T  ~  (x_q @ w_q[e].T) * x_scale[:, None] * w_scale[e][None, :]      fp32 accumulation

Shape legend: R rows, D the reduced (input) dimension.
"""

from __future__ import annotations

import torch

QUANTIZATIONS = ("fp8",)
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # the largest finite e4m3fn value
MIN_SCALE = 1e-12  # an all-zero row gets this scale (its values quantize to 0 either way)


def check_quantization(quantization: str | None) -> None:
    if quantization is not None and quantization not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantization!r}; choose one of {', '.join(QUANTIZATIONS)} or None")


def quantize_rows(x_RD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (x_q [..., D] e4m3fn, scale [...] fp32): each row scaled so its largest |value| is 448."""
    x = x_RD.float()
    scale = (x.abs().amax(dim=-1) / FP8_MAX).clamp_min(MIN_SCALE)
    x_q = (x / scale.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return x_q, scale

