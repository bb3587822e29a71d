"""The router's softmax over all experts, top-k and renormalisation in one kernel (``select_experts``).

Shape legend: T tokens, E experts, K top-k.

    probs = softmax(logits.float())      exp(x - max) / sum, over ALL E experts, fp32
    w, id = topk(probs, K)               largest first
    w     = w / w.sum(-1)                with renormalize

Ties: among equal probabilities the lower expert id comes first, both at the k-th place (which experts are
kept) and in the order of the k outputs; the torch path sorts stably to give the same ids. torch.topk promises
no order among equal values (on CUDA it keeps the lower ids at the k-th place, as here, but may order equal
values differently; on CPU either may differ); the weights are the same either way. Logits are assumed finite.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from omni_ep.layers.fused_ops.backend import exp_f32, runs_triton


@triton.jit
def _router_topk_kernel(
    logits_ptr,  # [T, E]
    weights_ptr,  # [T, K] fp32
    ids_ptr,  # [T, K] int64
    T,
    E,
    stride_t,
    TOP_K: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """BLOCK_T whole rows per program; the top-k by K rounds of (max, lowest id holding it, strike it out)."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    rows_read = tl.minimum(rows, T - 1).to(tl.int64)  # rows past T re-read the last one and are not stored
    cols = tl.arange(0, BLOCK_E)
    col_ok = cols < E
    x = tl.load(logits_ptr + rows_read[:, None] * stride_t + cols[None, :], mask=col_ok[None, :], other=-float("inf"))
    x = x.to(tl.float32)
    e = exp_f32(x - tl.max(x, axis=1)[:, None])  # padding columns: exp(-inf) = 0
    probs = tl.math.div_rn(e, tl.sum(e, axis=1)[:, None])
    probs = tl.where(col_ok[None, :], probs, -1.0)  # below every probability: never picked while K <= E

    slots = tl.arange(0, BLOCK_K)[None, :]
    weights = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
    ids = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.int32)
    for k in tl.static_range(TOP_K):
        best = tl.max(probs, axis=1)
        best_id = tl.min(tl.where(probs == best[:, None], cols[None, :], BLOCK_E), axis=1)
        weights = tl.where(slots == k, best[:, None], weights)
        ids = tl.where(slots == k, best_id[:, None], ids)
        probs = tl.where(cols[None, :] == best_id[:, None], -1.0, probs)
    if RENORMALIZE:
        weights = tl.math.div_rn(weights, tl.sum(weights, axis=1)[:, None])  # padding slots hold 0
    out = rows.to(tl.int64)[:, None] * TOP_K + slots
    mask = row_ok[:, None] & (slots < TOP_K)
    tl.store(weights_ptr + out, weights, mask=mask)
    tl.store(ids_ptr + out, ids.to(tl.int64), mask=mask)


def _router_topk_torch(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    probs_TE = torch.softmax(logits.float(), dim=-1)
    weights_TK, ids_TK = (t[:, :top_k] for t in torch.sort(probs_TE, dim=-1, descending=True, stable=True))
    if renormalize:
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
    return weights_TK, ids_TK


def router_topk(logits: torch.Tensor, top_k: int, renormalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] (fp32 in the model) -> (weights [T, K] fp32, ids [T, K] int64 expert ids)."""
    T, E = logits.shape
    if not 1 <= top_k <= E:
        raise ValueError(f"top_k must be in [1, E={E}], got {top_k}")
    if not runs_triton(logits):
        return _router_topk_torch(logits, top_k, renormalize)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    weights = torch.empty(T, top_k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(T, top_k, dtype=torch.int64, device=logits.device)
    if T:
        BLOCK_E = triton.next_power_of_2(E)
        BLOCK_T = max(1, min(16, 1024 // BLOCK_E))
        _router_topk_kernel[(triton.cdiv(T, BLOCK_T),)](
            logits, weights, ids, T, E, logits.stride(0),
            TOP_K=top_k, RENORMALIZE=renormalize, BLOCK_T=BLOCK_T, BLOCK_E=BLOCK_E,
            BLOCK_K=triton.next_power_of_2(top_k), num_warps=4, enable_fp_fusion=False,
        )
    return weights, ids
