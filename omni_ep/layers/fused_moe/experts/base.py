"""The expert-compute side of the MoE seam.

Shape legend: M tokens on this rank after dispatch, K top-k slots, H hidden size,
I expert intermediate size, E local experts.

Every implementation computes, for each row m,
    out[m] = sum_{k : topk_ids[m, k] >= 0} topk_weights[m, k] * down_e(silu(gate_e(x_m)) * up_e(x_m))
with e = topk_ids[m, k] a LOCAL expert id. Slots holding -1 belong to experts on other ranks and are
skipped; a row with no local slot is zero. Accumulation is fp32; the result has the dtype of x.

FP8 experts (fp8.py): w13 and w2 in e4m3fn with scales w13_scale [E, 2I] and w2_scale [E, H] (one per weight
row); x and the SwiGLU output h are quantized per row inside apply.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from omni_ep.layers.fused_moe.fp8 import FP8_DTYPE


class LocalExperts(ABC):
    """Runs this rank's experts on the tokens dispatch delivered.

    Weights (owned by the FusedMoE layer, passed in on each call):
      w13: [E, 2I, H]   rows 0..I-1 the gate projection, rows I..2I-1 the up projection
      w2:  [E, H, I]    the down projection
    """

    name: str = ""

    @classmethod
    def unsupported_reason(cls, device: torch.device, dtype: torch.dtype) -> str | None:
        """None when this implementation runs on (device, dtype), else a sentence saying why not."""
        return None

    @classmethod
    def fp8_unsupported_reason(cls, device: torch.device) -> str | None:
        """None when this implementation takes FP8 weights (with their scales) on device, else why not."""
        return f"the {cls.name} experts do not take FP8 weights"

    @abstractmethod
    def apply(
        self,
        hidden_states: torch.Tensor,  # [M, H]
        topk_ids: torch.Tensor,  # [M, K] int, local expert id or -1
        topk_weights: torch.Tensor,  # [M, K] fp32
        w13: torch.Tensor,  # [E, 2I, H]
        w2: torch.Tensor,  # [E, H, I]
        w13_scale: torch.Tensor | None = None,  # [E, 2I] fp32, with FP8 weights
        w2_scale: torch.Tensor | None = None,  # [E, H] fp32, with FP8 weights
    ) -> torch.Tensor:  # [M, H]
        ...


def check_fp8_weights(where: str, w13, w2, w13_scale, w2_scale) -> bool:
    """Whether the weights are FP8 (e4m3fn, with their scales [E, 2I] and [E, H]); raise when the weights and
    scales do not go together."""
    fp8 = w13.dtype == FP8_DTYPE
    if fp8 != (w2.dtype == FP8_DTYPE) or fp8 != (w13_scale is not None) or fp8 != (w2_scale is not None):
        raise ValueError(
            f"{where}: FP8 experts need both weights in {FP8_DTYPE} and both scales; got w13 {w13.dtype}, "
            f"w2 {w2.dtype}, w13_scale {'given' if w13_scale is not None else 'None'}, "
            f"w2_scale {'given' if w2_scale is not None else 'None'}"
        )
    if fp8 and (w13_scale.shape != w13.shape[:2] or w2_scale.shape != w2.shape[:2]):
        raise ValueError(f"{where}: scales {tuple(w13_scale.shape)}, {tuple(w2_scale.shape)} do not match the weights' "
                         f"rows {tuple(w13.shape[:2])}, {tuple(w2.shape[:2])}")
    return fp8
