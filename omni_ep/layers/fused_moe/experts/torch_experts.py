"""Reference local-expert compute in plain torch: sort by expert, two grouped matmuls, SwiGLU, un-permute.

Shape legend: M tokens, K top-k slots, P = routed (token, slot) pairs that hit a local expert,
H hidden size, I intermediate size, E local experts. No [M, E, capacity] tensor is ever built.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from omni_ep.layers.fused_moe.experts.base import LocalExperts, check_fp8_weights
from omni_ep.layers.fused_moe.fp8 import quantize_rows


def _grouped_mm_ok(a: torch.Tensor, b: torch.Tensor) -> bool:
    """torch._grouped_mm needs 16-byte aligned strides; on CUDA it takes bf16 only."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if a.device.type == "cuda" and a.dtype != torch.bfloat16:
        return False
    if a.device.type not in ("cuda", "cpu"):
        return False
    align = 16 // a.element_size()
    return a.shape[-1] % align == 0 and b.shape[-1] % align == 0 and b.shape[-2] % align == 0


def grouped_linear(x_PD: torch.Tensor, w_EFD: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Rows of x sorted by expert; counts[e] rows use w[e]. [P, D] x [E, F, D] -> [P, F]."""
    if _grouped_mm_ok(x_PD, w_EFD):
        offs = torch.tensor(counts, device=x_PD.device).cumsum(0).to(torch.int32)
        return torch._grouped_mm(x_PD, w_EFD.transpose(1, 2), offs=offs)
    out, start = [], 0
    for e, n in enumerate(counts):
        out.append(x_PD[start : start + n] @ w_EFD[e].t())
        start += n
    return torch.cat(out) if out else x_PD.new_empty(0, w_EFD.shape[1])


def scaled_grouped_linear(x_PD: torch.Tensor, w_q_EFD: torch.Tensor, w_scale_EF: torch.Tensor,
                          counts: list[int]) -> torch.Tensor:
    """FP8 weights with their row scales: rows of x sorted by expert, each quantized per row, times w_q[e]; fp32
    [P, F], the products of e4m3 values summed in fp32 and scaled as the Triton kernels' epilogues do."""
    x_q, x_scale = quantize_rows(x_PD)
    out, start = [], 0
    for e, n in enumerate(counts):
        rows = slice(start, start + n)
        acc = x_q[rows].float() @ w_q_EFD[e].float().t()
        out.append(acc * x_scale[rows].unsqueeze(1) * w_scale_EF[e].unsqueeze(0))
        start += n
    return torch.cat(out) if out else x_PD.new_empty(0, w_q_EFD.shape[1], dtype=torch.float32)


class TorchExperts(LocalExperts):
    """Sort + grouped matmul path; the reference every other implementation is checked against."""

    name = "torch"

    @classmethod
    def fp8_unsupported_reason(cls, device):
        if torch.device(device).type == "cuda":  # the reference dequantizes every expert to fp32 on each call
            return "the torch experts' FP8 path is a CPU reference; on GPUs FP8 runs in the triton experts"
        return None

    def apply(self, hidden_states, topk_ids, topk_weights, w13, w2, w13_scale=None, w2_scale=None):
        x_MH = hidden_states
        fp8 = check_fp8_weights("TorchExperts", w13, w2, w13_scale, w2_scale)  # before any rank-dependent return
        M, K = topk_ids.shape
        E, I = w13.shape[0], w2.shape[2]
        ids_P = topk_ids.reshape(-1).long()
        key_P = torch.where(ids_P >= 0, ids_P, E)  # non-local slots sort last
        order_P = torch.argsort(key_P, stable=True)
        # Host sync: grouped matmuls need the per-expert row counts on the host.
        counts = torch.bincount(key_P, minlength=E + 1)[:E].tolist()
        num_pairs = sum(counts)
        out_MH = torch.zeros(M, x_MH.shape[1], dtype=torch.float32, device=x_MH.device)
        if num_pairs == 0:
            return out_MH.to(x_MH.dtype)
        order_P = order_P[:num_pairs]
        token_P = order_P // K
        if fp8:
            gate, up = scaled_grouped_linear(x_MH[token_P], w13, w13_scale, counts).split(I, dim=-1)
            h_PI = (gate * torch.sigmoid(gate) * up).to(x_MH.dtype)  # as the Triton gate_up stores it
            y_PH = scaled_grouped_linear(h_PI, w2, w2_scale, counts)
        else:
            gate, up = grouped_linear(x_MH[token_P], w13, counts).split(I, dim=-1)
            h_PI = F.silu(gate) * up
            y_PH = grouped_linear(h_PI, w2, counts).float()
        y_PH *= topk_weights.reshape(-1)[order_P].float().unsqueeze(1)
        out_MH.index_add_(0, token_P, y_PH)
        return out_MH.to(x_MH.dtype)
