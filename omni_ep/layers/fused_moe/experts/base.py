"""The expert-compute side of the MoE seam.

Shape legend: M tokens on this rank after dispatch, K top-k slots, H hidden size,
I expert intermediate size, E local experts.

Every implementation computes, for each row m,
    out[m] = sum_{k : topk_ids[m, k] >= 0} topk_weights[m, k] * down_e(silu(gate_e(x_m)) * up_e(x_m))
with e = topk_ids[m, k] a LOCAL expert id. Slots holding -1 belong to experts on other ranks and are
skipped; a row with no local slot is zero. Accumulation is fp32; the result has the dtype of x.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


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

    @abstractmethod
    def apply(
        self,
        hidden_states: torch.Tensor,  # [M, H]
        topk_ids: torch.Tensor,  # [M, K] int, local expert id or -1
        topk_weights: torch.Tensor,  # [M, K] fp32
        w13: torch.Tensor,  # [E, 2I, H]
        w2: torch.Tensor,  # [E, H, I]
    ) -> torch.Tensor:  # [M, H]
        ...
