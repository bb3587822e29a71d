"""Timestep embedder and the latent <-> hidden-state adapters ("patch_embed", "final_layer") of HunyuanImage-3.0.

Shape legend: B batch, D model hidden size, C latent channels (32), h x w latent grid, F sinusoid dim (256),
P the adapters' hidden width (patch_embed_hidden_dim, 1024 in the real model).

GroupNorm(32, n) is used on P and on D, so tiny configs must pick both as multiples of 32.
Module and submodule names follow the checkpoint: `timestep_emb.mlp.{0,2}`, `patch_embed.model.{0,1}.*`,
`final_layer.model.{0,1}.*`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def timestep_sinusoids(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """t [B] (already sigma * 1000) -> [B, dim] fp32, [cos | sin] with frequencies max_period^(-i/(dim/2))."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args_BF = t.float().unsqueeze(-1) * freqs
    emb = torch.cat([torch.cos(args_BF), torch.sin(args_BF)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class HunyuanTimestepEmbedder(nn.Module):
    """t [B] -> [B, D]: sinusoids(256) -> Linear(256, D) -> exact GELU -> Linear(D, D). Keys `mlp.0.*`, `mlp.2.*`."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256, max_period: float = 10000.0):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.max_period = max_period
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.GELU(),
            nn.Linear(hidden_size, hidden_size),
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        if t.dim() != 1:
            raise ValueError(f"timesteps must be a 1-D tensor [B] of sigma * 1000, got shape {tuple(t.shape)}")
        t_freq = timestep_sinusoids(t, self.frequency_embedding_size, self.max_period)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))


def _check_group_norm_width(name: str, channels: int) -> None:
    if channels % 32 != 0:
        raise ValueError(f"{name}={channels} must be a multiple of 32 (GroupNorm(32, {name}))")


class HunyuanResBlock(nn.Module):
    """Timestep-conditioned 2-D ResBlock: x [B, C_in, h, w], emb [B, E] -> [B, C_out, h, w].

    h = Conv3x3(SiLU(GN(x))); scale, shift = Linear(SiLU(emb)).chunk(2);
    h = Conv3x3(Dropout(SiLU(GN(h) * (1 + scale) + shift))); out = skip(x) + h, skip = Conv1x1 when C_in != C_out.
    Keys: in_layers.{0: GN, 2: conv}, emb_layers.1, out_layers.{0: GN, 3: conv}, skip_connection.
    """

    def __init__(self, in_channels: int, emb_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        _check_group_norm_width("in_channels", in_channels)
        _check_group_norm_width("out_channels", out_channels)
        self.in_layers = nn.Sequential(
            nn.GroupNorm(32, in_channels),
            nn.SiLU(),
            nn.Conv2d(in_channels, out_channels, 3, padding=1),
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels))
        self.out_layers = nn.Sequential(
            nn.GroupNorm(32, out_channels),
            nn.SiLU(),
            nn.Dropout(dropout),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        if in_channels == out_channels:
            self.skip_connection = nn.Identity()
        else:
            self.skip_connection = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        emb_out = self.emb_layers(emb).to(h.dtype)
        scale, shift = emb_out[:, :, None, None].chunk(2, dim=1)
        norm, rest = self.out_layers[0], self.out_layers[1:]
        h = rest(norm(h) * (1 + scale) + shift)
        return self.skip_connection(x) + h


class HunyuanUNetDown(nn.Module):
    """"patch_embed": latents [B, C, h, w], emb [B, D] -> tokens [B, h*w, D] (row-major).

    model.0 = Conv3x3(C -> P), model.1 = HunyuanResBlock(P -> D). One call per sample: for two samples at once
    cuDNN picks a kernel for the 3x3 convolutions that takes 1.6x as long as two one-sample calls on an H200
    (benchmarks/results/adapters_h200.json; final_layer has no such gap). With channels-last conv weights
    (``HunyuanImage3Transformer2DModel.adapters_channels_last``) the latents go in channels-last too.
    """

    def __init__(
        self, in_channels: int = 32, emb_channels: int = 4096, hidden_channels: int = 1024, out_channels: int = 4096
    ):
        super().__init__()
        self.model = nn.ModuleList(
            [
                nn.Conv2d(in_channels, hidden_channels, 3, padding=1),
                HunyuanResBlock(hidden_channels, emb_channels, out_channels),
            ]
        )

    def forward(self, latents: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if latents.dim() != 4:
            raise ValueError(f"latents must be [B, C, h, w], got shape {tuple(latents.shape)}")
        if self.model[0].weight.is_contiguous(memory_format=torch.channels_last):
            latents = latents.contiguous(memory_format=torch.channels_last)
        samples = [self.model[1](self.model[0](latents[i : i + 1]), emb[i : i + 1]) for i in range(len(latents))]
        x = samples[0] if len(samples) == 1 else torch.cat(samples)
        return x.flatten(2).transpose(1, 2)


class HunyuanUNetUp(nn.Module):
    """"final_layer": hidden [B, h*w, D], emb [B, D] -> latent velocity [B, C, h, w].

    model.0 = HunyuanResBlock(D -> P), model.1 = GN32(P) -> SiLU -> Conv3x3(P -> C).
    """

    def __init__(
        self, in_channels: int = 4096, emb_channels: int = 4096, hidden_channels: int = 1024, out_channels: int = 32
    ):
        super().__init__()
        self.model = nn.ModuleList(
            [
                HunyuanResBlock(in_channels, emb_channels, hidden_channels),
                nn.Sequential(
                    nn.GroupNorm(32, hidden_channels),
                    nn.SiLU(),
                    nn.Conv2d(hidden_channels, out_channels, 3, padding=1),
                ),
            ]
        )

    def forward(self, hidden: torch.Tensor, emb: torch.Tensor, height: int, width: int) -> torch.Tensor:
        B, L, D = hidden.shape
        if L != height * width:
            raise ValueError(f"hidden has {L} tokens but the latent grid {height}x{width} needs {height * width}")
        x = hidden.transpose(1, 2).reshape(B, D, height, width)
        return self.model[1](self.model[0](x, emb))
