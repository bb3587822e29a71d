"""The all-to-all dispatch's copy of each token into the block of every rank it goes to, in one pass:
out[rows[t, r]] = src[t] for r = 0 .. R - 1.

Shape legend: T tokens, R rows per token (one per EP rank), H row width, M rows of the send buffer.

Eager torch takes an index_copy_ per rank, reading src R times; the kernel reads each row once and writes its R
copies. Where several tokens name one row (the dispatch's dump row), which of them lands there is unspecified,
as with index_copy_; the dispatch gives such rows no expert.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from omni_ep.layers.fused_ops.backend import runs_triton


@triton.jit
def _scatter_rows_kernel(
    src_ptr,  # [T, H]
    rows_ptr,  # [T, R] int64
    out_ptr,  # [M, H]
    T,
    H,
    stride_src,
    stride_rows,
    stride_out,
    R: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """BLOCK_T tokens x BLOCK_H columns per program."""
    tokens = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    token_ok = tokens < T
    mask = token_ok[:, None] & (cols < H)[None, :]
    x = tl.load(src_ptr + tokens[:, None] * stride_src + cols[None, :], mask=mask, other=0.0)
    for r in tl.static_range(R):
        row = tl.load(rows_ptr + tokens * stride_rows + r, mask=token_ok, other=0)
        tl.store(out_ptr + row[:, None] * stride_out + cols[None, :], x, mask=mask)


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
    src_TH = src_TH if src_TH.stride(1) == 1 else src_TH.contiguous()
    rows_TR = rows_TR.contiguous()
    (T, R), H = rows_TR.shape, src_TH.shape[1]
    if T and H and R:
        BLOCK_T, BLOCK_H = 4, min(1024, triton.next_power_of_2(H))
        _scatter_rows_kernel[(triton.cdiv(T, BLOCK_T), triton.cdiv(H, BLOCK_H))](
            src_TH, rows_TR, out_MH, T, H, src_TH.stride(0), rows_TR.stride(0), out_MH.stride(0),
            R=R, BLOCK_T=BLOCK_T, BLOCK_H=BLOCK_H, num_warps=4,
        )
    return out_MH
