"""2-D rotary position embedding of HunyuanImage-3.0.

Shape legend: S sequence length, B batch, N heads, D head dim (128 in the real model).

Positions: a text token at index n has y = x = n (plain 1-D RoPE). An image block of h x w tokens starting
at index L puts token (r, c) at
    y = L + (h*w - h)/2 + r,   x = L + (h*w - w)/2 + c      (float, truncated to an integer),
which centres the grid inside the 1-D span [L, L + h*w). Tokens after the block continue at L + h*w, i.e.
at their own index. Frequencies: theta_j = theta^(-2j/D), j < D/2; even j rotate by y, odd j by x;
cos/sin are taken of cat([angles, angles]) and applied with rotate_half (dim d pairs with dim d + D/2).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def rope_positions(
    seq_len: int,
    image_grids: Sequence[tuple[int, int, int]] = (),
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(pos_y [S], pos_x [S]) int64 for a sequence holding image blocks.

    image_grids: (start, height, width) per image block, in tokens; blocks must not overlap and must lie
    inside [0, seq_len).
    """
    if seq_len < 0:
        raise ValueError(f"seq_len must be >= 0, got {seq_len}")
    pos_y = torch.arange(seq_len, dtype=torch.int64, device=device)
    pos_x = pos_y.clone()
    last_end = 0
    for start, height, width in sorted(image_grids):
        if height <= 0 or width <= 0:
            raise ValueError(f"image grid must be at least 1x1 tokens, got {height}x{width} at {start}")
        end = start + height * width
        if start < last_end or end > seq_len:
            raise ValueError(
                f"image block [{start}, {end}) overlaps another block or runs past seq_len={seq_len}; "
                "pass non-overlapping (start, height, width) blocks inside the sequence"
            )
        # (h*w - h)/2 truncated == floor division, since every term is a non-negative integer.
        y0 = start + (height * width - height) // 2
        x0 = start + (height * width - width) // 2
        rows = torch.arange(height, dtype=torch.int64, device=device)
        cols = torch.arange(width, dtype=torch.int64, device=device)
        pos_y[start:end] = (y0 + rows).repeat_interleave(width)
        pos_x[start:end] = (x0 + cols).repeat(height)
        last_end = end
    return pos_y, pos_x


def image_rope_positions(
    seq_len: int, image_start: int, height: int, width: int, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(pos_y [S], pos_x [S]) int64 for a sequence with one height x width image block at image_start."""
    return rope_positions(seq_len, [(image_start, height, width)], device=device)


def rope_cos_sin(
    pos_y: torch.Tensor, pos_x: torch.Tensor, head_dim: int = 128, theta: float = 10000.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [..., S, D] fp32 from integer positions pos_y, pos_x [..., S]."""
    if head_dim % 4 != 0:
        raise ValueError(f"2-D RoPE needs head_dim divisible by 4 (even/odd pairs of halves), got {head_dim}")
    if pos_y.shape != pos_x.shape:
        raise ValueError(f"pos_y {tuple(pos_y.shape)} and pos_x {tuple(pos_x.shape)} must have the same shape")
    freq_J = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=pos_y.device).float() / head_dim))
    is_even_J = torch.arange(head_dim // 2, device=pos_y.device) % 2 == 0
    pos_SJ = torch.where(is_even_J, pos_y.unsqueeze(-1), pos_x.unsqueeze(-1)).float()
    angles_SJ = pos_SJ * freq_J
    angles_SD = torch.cat([angles_SJ, angles_SJ], dim=-1)
    return angles_SD.cos(), angles_SD.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[..., D] -> [..., D]: (x1, x2) -> (-x2, x1) over the two halves of the last dim."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, N, S, D] by cos, sin [S, D] or [B, S, D]; computed and returned in fp32."""
    if cos.dim() == 3:  # per-sample tables broadcast over heads
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    if x.shape[-2:] != cos.shape[-2:]:
        raise ValueError(f"x [..., S, D]={tuple(x.shape)} does not match cos/sin {tuple(cos.shape)} on (S, D)")
    x = x.float()
    return x * cos.float() + rotate_half(x) * sin.float()
