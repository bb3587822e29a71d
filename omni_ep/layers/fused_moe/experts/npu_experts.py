"""Local experts on Ascend NPUs through torch_npu's grouped matmul. UNTESTED on hardware: written against
torch_npu's documented `npu_grouped_matmul(x: list, weight: list, *, group_list, split_item, group_type,
group_list_type)`; this project has no NPU. Importing this module without torch_npu raises ImportError.

Shape legend: M tokens, K top-k, P local (token, slot) pairs, H hidden, I intermediate, E local experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    import torch_npu
except ImportError as exc:  # pragma: no cover - exercised only where torch_npu is absent
    raise ImportError(
        "the Ascend NPU experts need torch_npu (pip install torch-npu matching your CANN and torch versions)"
    ) from exc

from omni_ep.layers.fused_moe.experts.base import LocalExperts


def _npu_grouped_linear(x_PD: torch.Tensor, w_EFD: torch.Tensor, cumulative_counts: torch.Tensor) -> torch.Tensor:
    """[P, D] rows sorted by expert x [E, F, D] -> [P, F]; group_list_type=0 takes cumulative counts."""
    return torch_npu.npu_grouped_matmul(
        [x_PD], [w_EFD.transpose(1, 2)], group_list=cumulative_counts, split_item=2, group_type=0, group_list_type=0
    )[0]


class NpuExperts(LocalExperts):
    name = "npu"

    @classmethod
    def unsupported_reason(cls, device, dtype):
        if device.type != "npu":
            return f"npu experts run on Ascend NPUs only, not {device.type}"
        if dtype not in (torch.float16, torch.bfloat16):
            return f"npu_grouped_matmul takes float16 or bfloat16, not {dtype}"
        return None

    def apply(self, hidden_states, topk_ids, topk_weights, w13, w2, w13_scale=None, w2_scale=None):
        if w13_scale is not None or w2_scale is not None:
            raise ValueError(self.fp8_unsupported_reason(hidden_states.device))
        M, K = topk_ids.shape
        E, I = w13.shape[0], w2.shape[2]
        ids_P = topk_ids.reshape(-1).long()
        key_P = torch.where(ids_P >= 0, ids_P, E)
        order_P = torch.argsort(key_P, stable=True)
        cumulative = torch.bincount(key_P, minlength=E + 1)[:E].cumsum(0)
        # Host sync: the number of local pairs sizes the grouped matmul input.
        num_pairs = int(cumulative[-1]) if E else 0
        out_MH = torch.zeros(M, hidden_states.shape[1], dtype=torch.float32, device=hidden_states.device)
        if num_pairs == 0:
            return out_MH.to(hidden_states.dtype)
        order_P = order_P[:num_pairs]
        token_P = order_P // K
        gate, up = _npu_grouped_linear(hidden_states[token_P], w13, cumulative).split(I, dim=-1)
        y_PH = _npu_grouped_linear(F.silu(gate) * up, w2, cumulative).float()
        y_PH *= topk_weights.reshape(-1)[order_P].float().unsqueeze(1)
        out_MH.index_add_(0, token_P, y_PH)
        return out_MH.to(hidden_states.dtype)
