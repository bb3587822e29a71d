"""FP8 experts on Hopper through torch's FP8 grouped GEMM (``torch._scaled_grouped_mm``, CUTLASS, row-wise scales,
fp32 accumulation): the FP8 path TritonExperts takes where that GEMM runs.

    align (expert-sorted rows, each expert padded to BLOCK_M)  -> quantize x per token -> gather the rows
    -> gate_up = x_q @ w13_q[e].T  scaled               [R, 2I]  one grouped GEMM, bf16 out
    -> h = silu(gate) * up, quantized per row            [R, I]
    -> y = h_q @ w2_q[e].T  scaled                       [R, H]   one grouped GEMM, bf16 out
    -> out[m] = sum_k weight[m, k] * y[row of (m, k)]    [M, H]   fp32 sum

No host sync: the group offsets are the alignment's expert ends, on the device.

Shape legend: M tokens, K top-k slots, H hidden, I intermediate, E local experts, R padded sorted rows.
"""

from __future__ import annotations

import torch

BLOCK_M = 16  # each expert's rows padded to a multiple of this: the grouped GEMM's groups start 16-row aligned


def runs_here(x_MH: torch.Tensor, intermediate_size: int) -> bool:
    """Whether torch's FP8 grouped GEMM runs for activations x [M, H] and experts of width I: a Hopper GPU, a torch
    that has it, bf16 out (all it writes), and rows of H and I bytes that are multiples of 16."""
    return (x_MH.is_cuda and hasattr(torch, "_scaled_grouped_mm") and x_MH.dtype == torch.bfloat16
            and x_MH.shape[1] % 16 == 0 and intermediate_size % 16 == 0
            and torch.cuda.get_device_capability(x_MH.device) == (9, 0))


def fp8_grouped_experts(x_MH, topk_ids_MK, topk_weights_MK, w13_E2IH, w2_EHI, w13_scale_E2I, w2_scale_EH):
    """LocalExperts.apply for FP8 weights (base.py) -> [M, H] in x's dtype."""
    from omni_ep.layers.fused_moe.experts.triton_kernels.align import align_pairs_to_blocks
    from omni_ep.layers.fused_moe.experts.triton_kernels.gate_up_swiglu import gather_sorted_rows
    from omni_ep.layers.fused_moe.experts.triton_kernels.quantize_rows import quantize_rows_fp8
    from omni_ep.layers.fused_moe.experts.triton_kernels.topk_sum import topk_sum

    E, K = w13_E2IH.shape[0], topk_ids_MK.shape[1]
    align = align_pairs_to_blocks(topk_ids_MK, E, BLOCK_M)
    x_q_MH, x_scale_M = quantize_rows_fp8(x_MH)
    # Quantized once per token, then copied to its rows with its scale; padding rows stay unwritten (their
    # products are never read).
    x_q_RH, x_scale_R = gather_sorted_rows(x_q_MH, align, K, x_scale_M)
    gate_up_R2I = torch._scaled_grouped_mm(x_q_RH, w13_E2IH.transpose(1, 2), x_scale_R, w13_scale_E2I,
                                           offs=align.expert_end_E, out_dtype=x_MH.dtype)
    h_q_RI, h_scale_R = quantize_rows_fp8(gate_up_R2I, align.num_padded_rows, swiglu=True)
    y_RH = torch._scaled_grouped_mm(h_q_RI, w2_EHI.transpose(1, 2), h_scale_R, w2_scale_EH, offs=align.expert_end_E,
                                    out_dtype=x_MH.dtype)
    return topk_sum(y_RH, topk_ids_MK, E, align.row_of_pair_P, topk_weights_MK)
