"""VAE decoder of HunyuanImage-3.0 (`vae.decoder.*`; keys here are without that prefix).

Shape legend: B batch, C channels, T frames, h x w spatial size.

Every conv is a Conv3d with symmetric zero padding (time included: no causal padding, no special first
frame). The channel list is the VAE config's `block_out_channels` REVERSED. Level i upsamples space when
i < log2(ffactor_spatial) and time when i < log2(ffactor_temporal); an upsample is a conv to c_out * f
channels (f = 8 with time, 4 without) rearranged depth-to-space, plus a channel-repeat shortcut rearranged
the same way. So a T=1 latent leaves the real decoder (ffactor_temporal 4) as 4 frames; the text-to-image
path keeps the last one. GroupNorm(32, eps 1e-6) everywhere, so every width must be a multiple of 32.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _group_norm(channels: int) -> nn.GroupNorm:
    if channels % 32 != 0:
        raise ValueError(f"VAE channel width {channels} must be a multiple of 32 (GroupNorm(32, C))")
    return nn.GroupNorm(32, channels, eps=1e-6)


def _conv(in_channels: int, out_channels: int, kernel_size: int) -> nn.Conv3d:
    return nn.Conv3d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)


def _log2_factor(name: str, factor: int) -> int:
    levels = int(math.log2(factor)) if factor >= 1 else -1
    if factor < 1 or 2**levels != factor:
        raise ValueError(f"{name} must be a power of two, got {factor}")
    return levels


class HunyuanVAEResnetBlock(nn.Module):
    """x [B, C_in, T, h, w] -> [B, C_out, T, h, w]: x' + conv2(swish(norm2(conv1(swish(norm1(x)))))).

    x' = nin_shortcut(x) (1x1x1) when C_in != C_out, else x.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = _group_norm(in_channels)
        self.conv1 = _conv(in_channels, out_channels, 3)
        self.norm2 = _group_norm(out_channels)
        self.conv2 = _conv(out_channels, out_channels, 3)
        if in_channels != out_channels:
            self.nin_shortcut = _conv(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class HunyuanVAEAttnBlock(nn.Module):
    """x [B, C, T, h, w] -> same: x + proj_out(single-head softmax attention over all T*h*w positions)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _group_norm(channels)
        self.q = _conv(channels, channels, 1)
        self.k = _conv(channels, channels, 1)
        self.v = _conv(channels, channels, 1)
        self.proj_out = _conv(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, T, H, W = x.shape
        h = self.norm(x)
        q_BLC, k_BLC, v_BLC = (proj(h).flatten(2).transpose(1, 2).unsqueeze(1) for proj in (self.q, self.k, self.v))
        out_BLC = F.scaled_dot_product_attention(q_BLC, k_BLC, v_BLC).squeeze(1)
        out = out_BLC.transpose(1, 2).reshape(B, C, T, H, W)
        return x + self.proj_out(out)


def depth_to_space(x: torch.Tensor, r_t: int, r_s: int) -> torch.Tensor:
    """[B, (r_t r_s r_s c), T, h, w] -> [B, c, T*r_t, h*r_s, w*r_s]; channel index = ((i_t*r_s + i_h)*r_s + i_w)*c + k."""
    B, C, T, H, W = x.shape
    c = C // (r_t * r_s * r_s)
    x = x.reshape(B, r_t, r_s, r_s, c, T, H, W)
    x = x.permute(0, 4, 5, 1, 6, 2, 7, 3)  # B c T r_t H r_s W r_s
    return x.reshape(B, c, T * r_t, H * r_s, W * r_s)


class HunyuanVAEUpsample(nn.Module):
    """x [B, C_in, T, h, w] -> [B, C_out, T*r_t, 2h, 2w], r_t = 2 if temporal else 1.

    out = depth_to_space(conv(x)) + depth_to_space(x repeated f*C_out/C_in times per channel), f = r_t * 4.
    """

    def __init__(self, in_channels: int, out_channels: int, temporal: bool):
        super().__init__()
        self.r_t = 2 if temporal else 1
        factor = self.r_t * 4
        if (factor * out_channels) % in_channels != 0:
            raise ValueError(
                f"upsample {in_channels}->{out_channels} channels: {factor}*{out_channels} must be divisible by "
                f"{in_channels} for the channel-repeat shortcut; choose block_out_channels accordingly"
            )
        self.repeats = factor * out_channels // in_channels
        self.conv = _conv(in_channels, out_channels * factor, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = depth_to_space(self.conv(x), self.r_t, 2)
        shortcut = depth_to_space(x.repeat_interleave(self.repeats, dim=1), self.r_t, 2)
        return h + shortcut


class HunyuanVAEDecoder(nn.Module):
    """z [B, latent_channels, T, h, w] -> [B, out_channels, T * ffactor_temporal, h * ffactor_spatial, w * ffactor_spatial].

    Arguments are the VAE config's own fields; block_out_channels is given in config (encoder) order and
    reversed here. Defaults are the real model's.
    """

    def __init__(
        self,
        latent_channels: int = 32,
        out_channels: int = 3,
        block_out_channels: Sequence[int] = (128, 256, 512, 1024, 1024),
        layers_per_block: int = 2,
        ffactor_spatial: int = 16,
        ffactor_temporal: int = 4,
        upsample_match_channel: bool = True,
    ):
        super().__init__()
        channels = list(reversed(block_out_channels))
        spatial_levels = _log2_factor("ffactor_spatial", ffactor_spatial)
        temporal_levels = _log2_factor("ffactor_temporal", ffactor_temporal)
        if temporal_levels > spatial_levels:
            raise ValueError(f"ffactor_temporal={ffactor_temporal} cannot exceed ffactor_spatial={ffactor_spatial}")
        if spatial_levels >= len(channels):
            raise ValueError(
                f"ffactor_spatial={ffactor_spatial} needs {spatial_levels} upsampling levels plus a last one: "
                f"block_out_channels must have at least {spatial_levels + 1} entries, got {len(channels)}"
            )
        if channels[0] % latent_channels != 0:
            raise ValueError(
                f"the widest block ({channels[0]}) must be a multiple of latent_channels={latent_channels} "
                "(conv_in adds z repeated over channels)"
            )
        self.latent_channels = latent_channels
        self.ffactor_spatial = ffactor_spatial
        self.ffactor_temporal = ffactor_temporal
        self.block_out_channels = tuple(block_out_channels)
        self.z_repeats = channels[0] // latent_channels

        block_in = channels[0]
        self.conv_in = _conv(latent_channels, block_in, 3)
        self.mid = nn.Module()
        self.mid.block_1 = HunyuanVAEResnetBlock(block_in, block_in)
        self.mid.attn_1 = HunyuanVAEAttnBlock(block_in)
        self.mid.block_2 = HunyuanVAEResnetBlock(block_in, block_in)

        self.up = nn.ModuleList()
        for level, block_out in enumerate(channels):
            up = nn.Module()
            up.block = nn.ModuleList()
            for _ in range(layers_per_block + 1):
                up.block.append(HunyuanVAEResnetBlock(block_in, block_out))
                block_in = block_out
            if level < spatial_levels:
                next_out = channels[level + 1] if upsample_match_channel else block_in
                up.upsample = HunyuanVAEUpsample(block_in, next_out, temporal=level < temporal_levels)
                block_in = next_out
            self.up.append(up)

        self.norm_out = _group_norm(block_in)
        self.conv_out = _conv(block_in, out_channels, 3)

    @classmethod
    def from_vae_config(cls, config: Mapping) -> HunyuanVAEDecoder:
        """Build from the VAE's config.json fields (encoder-only and scaling fields are ignored)."""
        names = (
            "latent_channels",
            "out_channels",
            "block_out_channels",
            "layers_per_block",
            "ffactor_spatial",
            "ffactor_temporal",
            "upsample_match_channel",
        )
        return cls(**{name: config[name] for name in names if name in config})

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.dim() != 5 or z.shape[1] != self.latent_channels:
            raise ValueError(
                f"z must be [B, {self.latent_channels}, T, h, w]; got shape {tuple(z.shape)} "
                "(add the time axis with z[:, :, None] for images)"
            )
        h = self.conv_in(z) + z.repeat_interleave(self.z_repeats, dim=1)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for up in self.up:
            for block in up.block:
                h = block(h)
            if hasattr(up, "upsample"):
                h = up.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


def decode_latents(decoder: HunyuanVAEDecoder, latents: torch.Tensor, scaling_factor: float) -> torch.Tensor:
    """latents [B, C, h, w] -> images [B, 3, H, W] in [0, 1] (fp32).

    z = latents / scaling_factor with a time axis T=1; the decoder makes ffactor_temporal frames and the
    LAST one is kept; image = (x / 2 + 0.5).clamp(0, 1).
    """
    if latents.dim() != 4:
        raise ValueError(f"latents must be [B, C, h, w], got shape {tuple(latents.shape)}")
    dtype = next(decoder.parameters()).dtype
    z = (latents / scaling_factor).to(dtype).unsqueeze(2)
    frames = decoder(z)
    return (frames[:, :, -1].float() / 2 + 0.5).clamp(0, 1)
