"""Sum each token's local slots: out[m] = sum_{k : ids[m, k] >= 0} y[row(m*K + k)], accumulated in fp32, each
term times its routing weight where the down GEMM has not applied it (weights given).

row(p) is p where the down GEMM wrote its rows in pair order, and align's row_of_pair[p] where it wrote them in
expert-sorted order (then this sum is also the un-permute).

Shape legend: M tokens, K top-k slots, P = M*K pairs, H hidden, R rows of y.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _topk_sum_kernel(y_ptr, ids_ptr, row_of_pair_ptr, weights_ptr, out_ptr, H, num_experts, stride_ym, stride_om,
                     TOP_K: tl.constexpr, BLOCK_H: tl.constexpr, GATHER: tl.constexpr, WEIGHTED: tl.constexpr):
    m = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    in_h = cols < H
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for k in tl.static_range(TOP_K):
        expert = tl.load(ids_ptr + m * TOP_K + k + tl.zeros((BLOCK_H,), dtype=tl.int32))  # broadcast per column
        local = in_h & (expert >= 0) & (expert < num_experts)
        pair = m * TOP_K + k
        row = pair
        if GATHER:
            row = tl.load(row_of_pair_ptr + pair + tl.zeros((BLOCK_H,), dtype=tl.int32), mask=local, other=0)
            row = row.to(tl.int64)
        y = tl.load(y_ptr + row * stride_ym + cols, mask=local, other=0.0).to(tl.float32)
        if WEIGHTED:
            y *= tl.load(weights_ptr + pair + tl.zeros((BLOCK_H,), dtype=tl.int32), mask=local, other=0.0)
        acc += y
    tl.store(out_ptr + m * stride_om + cols, acc.to(out_ptr.dtype.element_ty), mask=in_h)


def topk_sum(y_RH: torch.Tensor, topk_ids_MK: torch.Tensor, num_experts: int,
             row_of_pair_P: torch.Tensor | None = None, topk_weights_MK: torch.Tensor | None = None) -> torch.Tensor:
    """y [R, H], topk_ids [M, K] -> out [M, H] in y's dtype. Pair p = m*K + k is row p of y (R = P), or row
    row_of_pair_P[p] where that [P] int32 map is given; rows of non-local slots are not read. topk_weights
    [M, K] fp32: each row times its pair's weight (when the down GEMM has not)."""
    M, K = topk_ids_MK.shape
    H = y_RH.shape[1]
    ids = topk_ids_MK if topk_ids_MK.is_contiguous() else topk_ids_MK.contiguous()
    out_MH = torch.empty(M, H, dtype=y_RH.dtype, device=y_RH.device)
    if M == 0:
        return out_MH
    block_h = min(1024, triton.next_power_of_2(H))
    weights = None if topk_weights_MK is None else topk_weights_MK.float().contiguous()
    _topk_sum_kernel[(M, triton.cdiv(H, block_h))](
        y_RH, ids, row_of_pair_P, weights, out_MH, H, num_experts, y_RH.stride(0), out_MH.stride(0), TOP_K=K,
        BLOCK_H=block_h, GATHER=row_of_pair_P is not None, WEIGHTED=weights is not None,
    )
    return out_MH
