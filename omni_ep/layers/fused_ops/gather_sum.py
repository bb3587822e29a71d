"""The all-to-all combine's sum in one pass: out[t] = src[rows[t, 0]] + ... + src[rows[t, R - 1]].

Shape legend: M rows sent back by the EP ranks, T tokens, R rows per token (one per EP rank), H hidden.

The sum is taken in fp32 in the order r = 0 .. R - 1 and cast once to src's dtype: the fixed order keeps the result
independent of timing. Eager torch needs a gather, a cast to fp32, then a gather and an add per further row and a
cast back (2R + 1 passes over [T, H]); the kernel reads each row once and writes the result once, with the same
fp32 additions in the same order (bit-equal).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from omni_ep.layers.fused_ops.backend import runs_triton


@triton.jit
def _gather_sum_kernel(
    src_ptr,  # [M, H]
    rows_ptr,  # [T, R] int64
    out_ptr,  # [T, H]
    T,
    H,
    stride_src,
    stride_rows,
    stride_out,
    R: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """BLOCK_T tokens x BLOCK_H channels per program."""
    tokens = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    token_ok = tokens < T
    mask = token_ok[:, None] & (cols < H)[None, :]
    row = tl.load(rows_ptr + tokens * stride_rows, mask=token_ok, other=0)
    acc = tl.load(src_ptr + row[:, None] * stride_src + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    for r in tl.static_range(1, R):
        row = tl.load(rows_ptr + tokens * stride_rows + r, mask=token_ok, other=0)
        acc += tl.load(src_ptr + row[:, None] * stride_src + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + tokens[:, None] * stride_out + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


def _gather_sum_torch(src_MH: torch.Tensor, rows_TR: torch.Tensor) -> torch.Tensor:
    out_TH = src_MH[rows_TR[:, 0]].float()
    for r in range(1, rows_TR.shape[1]):
        out_TH += src_MH[rows_TR[:, r]]
    return out_TH.to(src_MH.dtype)


def gather_sum(src_MH: torch.Tensor, rows_TR: torch.Tensor) -> torch.Tensor:
    """src [M, H], rows [T, R] int64 (each in [0, M)) -> [T, H] in src's dtype: row t is the fp32 sum of
    src[rows[t, 0]], ..., src[rows[t, R - 1]] in that order, cast once."""
    if src_MH.dim() != 2 or rows_TR.dim() != 2 or rows_TR.shape[1] < 1 or rows_TR.dtype != torch.int64:
        raise ValueError(f"gather_sum takes src [M, H] and int64 rows [T, R >= 1]; got {tuple(src_MH.shape)} and "
                         f"{tuple(rows_TR.shape)} {rows_TR.dtype}")
    if not runs_triton(src_MH):
        return _gather_sum_torch(src_MH, rows_TR)
    src_MH = src_MH if src_MH.stride(1) == 1 else src_MH.contiguous()
    rows_TR = rows_TR.contiguous()
    (T, R), H = rows_TR.shape, src_MH.shape[1]
    out_TH = torch.empty(T, H, dtype=src_MH.dtype, device=src_MH.device)
    if T and H:
        BLOCK_T, BLOCK_H = 4, min(1024, triton.next_power_of_2(H))
        _gather_sum_kernel[(triton.cdiv(T, BLOCK_T), triton.cdiv(H, BLOCK_H))](
            src_MH, rows_TR, out_TH, T, H, src_MH.stride(0), rows_TR.stride(0), out_TH.stride(0),
            R=R, BLOCK_T=BLOCK_T, BLOCK_H=BLOCK_H, num_warps=4, enable_fp_fusion=False,
        )
    return out_TH
