"""The all-to-all's row movements between a rank's tokens and the per-rank blocks, each in one pass.

Shape legend: T tokens, R rows per token (one per EP rank), H row width, M rows of the blocks.

``scatter_rows`` (dispatch): blocks[rows[t, r]] = tokens[t] for r = 0 .. R - 1. Eager torch takes an index_copy_
per rank, reading the tokens R times; the kernel reads each token once and writes its R copies. Where several
tokens name one row (the dispatch's dump row), which of them lands there is unspecified, as with index_copy_; the
dispatch gives such rows no expert.

``gather_sum`` (combine): tokens[t] = blocks[rows[t, 0]] + ... + blocks[rows[t, R - 1]], in fp32 in the order
r = 0 .. R - 1 and cast once to the blocks' dtype: the fixed order keeps the result independent of timing. Eager
torch needs a gather, a cast to fp32, then a gather and an add per further row and a cast back (2R + 1 passes over
[T, H]); the kernel reads each row once and writes the result once, with the same fp32 additions in the same
order (bit-equal).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from omni_ep.layers.fused_ops.backend import runs_triton


@triton.jit
def _token_blocks_kernel(
    tokens_ptr,  # [T, H]: read by the scatter, written by the gather-sum
    rows_ptr,  # [T, R] int64
    blocks_ptr,  # [M, H]: written by the scatter, read by the gather-sum
    T,
    H,
    stride_tokens,
    stride_rows,
    stride_blocks,
    R: tl.constexpr,
    GATHER_SUM: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """BLOCK_T tokens x BLOCK_H columns per program."""
    tokens = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    token_ok = tokens < T
    mask = token_ok[:, None] & (cols < H)[None, :]
    token_tile = tokens_ptr + tokens[:, None] * stride_tokens + cols[None, :]
    if GATHER_SUM:
        row = tl.load(rows_ptr + tokens * stride_rows, mask=token_ok, other=0)
        acc = tl.load(blocks_ptr + row[:, None] * stride_blocks + cols[None, :], mask=mask, other=0.0)
        acc = acc.to(tl.float32)
        for r in tl.static_range(1, R):
            row = tl.load(rows_ptr + tokens * stride_rows + r, mask=token_ok, other=0)
            block_tile = tl.load(blocks_ptr + row[:, None] * stride_blocks + cols[None, :], mask=mask, other=0.0)
            acc += block_tile.to(tl.float32)
        tl.store(token_tile, acc.to(tokens_ptr.dtype.element_ty), mask=mask)
    else:
        x = tl.load(token_tile, mask=mask, other=0.0)
        for r in tl.static_range(R):
            row = tl.load(rows_ptr + tokens * stride_rows + r, mask=token_ok, other=0)
            tl.store(blocks_ptr + row[:, None] * stride_blocks + cols[None, :], x, mask=mask)


def _launch(tokens_TH: torch.Tensor, rows_TR: torch.Tensor, blocks_MH: torch.Tensor, gather_sum: bool) -> None:
    (T, R), H = rows_TR.shape, tokens_TH.shape[1]
    if T and H and R:
        BLOCK_T, BLOCK_H = 4, min(1024, triton.next_power_of_2(H))
        _token_blocks_kernel[(triton.cdiv(T, BLOCK_T), triton.cdiv(H, BLOCK_H))](
            tokens_TH, rows_TR, blocks_MH, T, H, tokens_TH.stride(0), rows_TR.stride(0), blocks_MH.stride(0),
            R=R, GATHER_SUM=gather_sum, BLOCK_T=BLOCK_T, BLOCK_H=BLOCK_H, num_warps=4, enable_fp_fusion=False,
        )


def scatter_rows(src_TH: torch.Tensor, rows_TR: torch.Tensor, out_MH: torch.Tensor) -> torch.Tensor:
    """src [T, H], rows [T, R] int64 (each in [0, M)), out [M, H] of src's dtype: writes src[t] into rows
    rows[t, 0], ..., rows[t, R - 1] of out; other rows keep their contents. Returns out."""
    if (src_TH.dim() != 2 or rows_TR.dim() != 2 or out_MH.dim() != 2 or rows_TR.shape[0] != src_TH.shape[0]
            or rows_TR.dtype != torch.int64 or out_MH.shape[1] != src_TH.shape[1] or out_MH.dtype != src_TH.dtype):
        raise ValueError(f"scatter_rows takes src [T, H], int64 rows [T, R] and out [M, H] of src's dtype; got "
                         f"{tuple(src_TH.shape)} {src_TH.dtype}, {tuple(rows_TR.shape)} {rows_TR.dtype}, "
                         f"{tuple(out_MH.shape)} {out_MH.dtype}")
    if not runs_triton(src_TH):
        for r in range(rows_TR.shape[1]):
            out_MH.index_copy_(0, rows_TR[:, r], src_TH)
        return out_MH
    if out_MH.stride(1) != 1:
        raise ValueError("scatter_rows writes rows of out: its last dim must be contiguous")
    _launch(src_TH if src_TH.stride(1) == 1 else src_TH.contiguous(), rows_TR.contiguous(), out_MH, gather_sum=False)
    return out_MH


def gather_sum(src_MH: torch.Tensor, rows_TR: torch.Tensor) -> torch.Tensor:
    """src [M, H], rows [T, R] int64 (each in [0, M)) -> [T, H] in src's dtype: row t is the fp32 sum of
    src[rows[t, 0]], ..., src[rows[t, R - 1]] in that order, cast once."""
    if src_MH.dim() != 2 or rows_TR.dim() != 2 or rows_TR.shape[1] < 1 or rows_TR.dtype != torch.int64:
        raise ValueError(f"gather_sum takes src [M, H] and int64 rows [T, R >= 1]; got {tuple(src_MH.shape)} and "
                         f"{tuple(rows_TR.shape)} {rows_TR.dtype}")
    if not runs_triton(src_MH):
        out_TH = src_MH[rows_TR[:, 0]].float()
        for r in range(1, rows_TR.shape[1]):
            out_TH += src_MH[rows_TR[:, r]]
        return out_TH.to(src_MH.dtype)
    src_MH = src_MH if src_MH.stride(1) == 1 else src_MH.contiguous()
    out_TH = torch.empty(rows_TR.shape[0], src_MH.shape[1], dtype=src_MH.dtype, device=src_MH.device)
    _launch(out_TH, rows_TR.contiguous(), src_MH, gather_sum=True)
    return out_TH
