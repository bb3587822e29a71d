"""Sum each token's local slots: out[m] = sum_{k : ids[m, k] >= 0} y[m*K + k], accumulated in fp32.

Shape legend: M tokens, K top-k slots, H hidden.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _topk_sum_kernel(y_ptr, ids_ptr, out_ptr, H, num_experts, stride_ym, stride_om,
                     TOP_K: tl.constexpr, BLOCK_H: tl.constexpr):
    m = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    in_h = cols < H
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for k in tl.static_range(TOP_K):
        expert = tl.load(ids_ptr + m * TOP_K + k + tl.zeros((BLOCK_H,), dtype=tl.int32))  # broadcast per column
        local = in_h & (expert >= 0) & (expert < num_experts)
        acc += tl.load(y_ptr + (m * TOP_K + k) * stride_ym + cols, mask=local, other=0.0).to(tl.float32)
    tl.store(out_ptr + m * stride_om + cols, acc.to(out_ptr.dtype.element_ty), mask=in_h)


def topk_sum(y_PH: torch.Tensor, topk_ids_MK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """y [M*K, H] (rows of non-local slots unread), topk_ids [M, K] -> out [M, H] in y's dtype."""
    M, K = topk_ids_MK.shape
    H = y_PH.shape[1]
    ids = topk_ids_MK if topk_ids_MK.is_contiguous() else topk_ids_MK.contiguous()
    out_MH = torch.empty(M, H, dtype=y_PH.dtype, device=y_PH.device)
    if M == 0:
        return out_MH
    block_h = min(1024, triton.next_power_of_2(H))
    _topk_sum_kernel[(M, triton.cdiv(H, block_h))](
        y_PH, ids, out_MH, H, num_experts, y_PH.stride(0), out_MH.stride(0), TOP_K=K, BLOCK_H=block_h
    )
    return out_MH
