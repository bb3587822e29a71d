"""VAE decoder of HunyuanImage-3.0 (`vae.decoder.*`; keys here are without that prefix).

Shape legend: B batch, C channels, T frames, h x w spatial size.

Every conv is a Conv3d with symmetric zero padding (time included: no causal padding, no special first
frame). The channel list is the VAE config's `block_out_channels` REVERSED. Level i upsamples space when
i < log2(ffactor_spatial) and time when i < log2(ffactor_temporal); an upsample is a conv to c_out * f
channels (f = 8 with time, 4 without) rearranged depth-to-space, plus a channel-repeat shortcut rearranged
the same way. So a T=1 latent leaves the real decoder (ffactor_temporal 4) as 4 frames; the text-to-image
path keeps the last one. GroupNorm(32, eps 1e-6) everywhere, so every width must be a multiple of 32.

The parameters are those of nn.Conv3d / nn.GroupNorm (checkpoint names and shapes), but the convs run as 2D
convolutions where that is exact or faster (vae_conv), and decode_latents can split the image over ranks
(vae_band).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from omni_ep.distributed.group_coordinator import GroupCoordinator
from omni_ep.models.hunyuan_image3.vae_band import HunyuanVAEBand
from omni_ep.models.hunyuan_image3.vae_conv import TIME_CONVS, channels_innermost, conv3d_frames, preferred_kernels


class HunyuanVAEConv3d(nn.Conv3d):
    """nn.Conv3d (same parameters) computed by vae_conv.conv3d_frames: a 2D conv on one frame, and the
    formulation ``time_conv`` (None: the device's preferred) on several."""

    time_conv: str | None = None

    def forward(self, x: torch.Tensor, last_frame_only: bool = False) -> torch.Tensor:
        time_conv = self.time_conv or preferred_kernels(x.device)[0]
        return conv3d_frames(x, self.weight, self.bias, time_conv, last_frame_only)


class HunyuanVAEGroupNorm(nn.GroupNorm):
    """nn.GroupNorm (same parameters) over [B, C, T, h, w] in any memory layout, or over a band of rows.

    Contiguous whole tensors use F.group_norm. Otherwise the statistics per (batch, group) over (C/G, T, h, w)
    take two passes over x (over the band's own rows, each pass's sums all-reduced over the band's ranks):
    the mean, then the second moment about it (no sum-of-squares cancellation), summed per channel in fp32
    and per group in fp64; x * scale + shift is then applied in one pass, in x's layout.
    """

    def forward(self, x: torch.Tensor, band: HunyuanVAEBand | None = None) -> torch.Tensor:
        if band is None and x.is_contiguous():
            return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        G, per_group = self.num_groups, x.shape[1] // self.num_groups
        all_reduce = (lambda t: t) if band is None else band.group.all_reduce
        rows = x if band is None else band.own_rows(x)

        def group_sums(t_BCThw):  # [B, G] fp64
            return t_BCThw.sum((2, 3, 4), dtype=torch.float32).unflatten(1, (G, per_group)).double().sum(-1)

        sums_BG = group_sums(rows)
        count_BG = torch.full_like(sums_BG, rows[0, :per_group].numel())
        sums_BG, count_BG = all_reduce(torch.stack([sums_BG, count_BG])).unbind(0)
        mean_BC = (sums_BG / count_BG).repeat_interleave(per_group, dim=1).float()
        centred = rows - mean_BC[:, :, None, None, None]  # fp32
        var_BC = (all_reduce(group_sums(centred.square_())) / count_BG).repeat_interleave(per_group, dim=1).float()
        scale_BC = (var_BC + self.eps).rsqrt() * self.weight
        shift_BC = self.bias - mean_BC * scale_BC
        scale, shift = (t[:, :, None, None, None] for t in (scale_BC, shift_BC))
        # fp32 math stored in x.dtype in one pass; out= has no autograd, so under grad mode it is two passes.
        out = None if torch.is_grad_enabled() else torch.empty_like(x)
        return torch.addcmul(shift, x, scale, out=out).to(x.dtype)


def _group_norm(channels: int) -> HunyuanVAEGroupNorm:
    if channels % 32 != 0:
        raise ValueError(f"VAE channel width {channels} must be a multiple of 32 (GroupNorm(32, C))")
    return HunyuanVAEGroupNorm(32, channels, eps=1e-6)


def _conv(in_channels: int, out_channels: int, kernel_size: int) -> HunyuanVAEConv3d:
    return HunyuanVAEConv3d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)


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

    def forward(self, x: torch.Tensor, band: HunyuanVAEBand | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x, band), inplace=True))
        h = self.conv2(F.silu(self.norm2(h, band), inplace=True))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return h.add_(x)


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
    """[B, (r_t r_s r_s c), T, h, w] -> [B, c, T*r_t, h*r_s, w*r_s]; channel index = ((i_t*r_s + i_h)*r_s + i_w)*c + k.

    One copy, into channels_last_3d when x has its channels innermost, else contiguous.
    """
    B, _, T, H, W = x.shape
    channels_last = channels_innermost(x)
    x = x.unflatten(1, (r_t, r_s, r_s, -1))  # B r_t r_s r_s c T H W: a view in any layout
    if channels_last:
        x = x.permute(0, 5, 1, 6, 2, 7, 3, 4)  # B T r_t H r_s W r_s c
        return x.reshape(B, T * r_t, H * r_s, W * r_s, -1).permute(0, 4, 1, 2, 3)
    x = x.permute(0, 4, 5, 1, 6, 2, 7, 3)  # B c T r_t H r_s W r_s
    return x.reshape(B, -1, T * r_t, H * r_s, W * r_s)


class HunyuanVAEUpsample(nn.Module):
    """x [B, C_in, T, h, w] -> [B, C_out, T*r_t, 2h, 2w], r_t = 2 if temporal else 1.

    out = depth_to_space(conv(x) + x repeated f*C_out/C_in times per channel), f = r_t * 4 (the shortcut added
    before the one depth_to_space, in place).
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
        h = self.conv(x)
        h.unflatten(1, (x.shape[1], self.repeats)).add_(x.unsqueeze(2))  # channel i*repeats + r gets x[:, i]
        return depth_to_space(h, self.r_t, 2)


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
        self.channels_last: bool | None = None  # set_kernels

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

    def set_kernels(self, time_conv: str | None = None, channels_last: bool | None = None) -> HunyuanVAEDecoder:
        """How the convs run; the results agree to fp32 rounding (~1e-7 relative) whatever is chosen.

        time_conv: the T > 1 convs as "conv3d" or "stacked_conv2d" (vae_conv);
        channels_last: activations as channels_last_3d ([B, T, h, w, C] in memory) instead of contiguous;
        None: the input device's preferred (vae_conv.PREFERRED_KERNELS).
        """
        if time_conv is not None and time_conv not in TIME_CONVS:
            raise ValueError(f"time_conv must be one of {TIME_CONVS} or None, got {time_conv!r}")
        for module in self.modules():
            if isinstance(module, HunyuanVAEConv3d):
                module.time_conv = time_conv
        self.channels_last = channels_last
        return self

    def forward(
        self, z: torch.Tensor, band: HunyuanVAEBand | None = None, last_frame_only: bool = False
    ) -> torch.Tensor:
        """frames [B, out_channels, T', H, W]; T' = 1 (the last frame, the only one computed) with last_frame_only.

        band: this rank's rows of a decode split over ranks (vae_band): conv_in and the mid block run over the
        whole latent, the levels over the band's window, and only its own H rows are returned.
        """
        if z.dim() != 5 or z.shape[1] != self.latent_channels:
            raise ValueError(
                f"z must be [B, {self.latent_channels}, T, h, w]; got shape {tuple(z.shape)} "
                "(add the time axis with z[:, :, None] for images)"
            )
        channels_last = preferred_kernels(z.device)[1] if self.channels_last is None else self.channels_last
        if channels_last:
            z = z.contiguous(memory_format=torch.channels_last_3d)
        h = self.conv_in(z)
        h.unflatten(1, (self.latent_channels, self.z_repeats)).add_(z.unsqueeze(2))  # + z repeated per channel
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        if band is not None:
            h = band.enter(h, rows_start=0)
        for up in self.up:
            for block in up.block:
                h = block(h, band)
            if hasattr(up, "upsample"):
                h = up.upsample(h)
                if band is not None:
                    h = band.enter_level(h)
        frames = self.conv_out(F.silu(self.norm_out(h, band), inplace=True), last_frame_only=last_frame_only)
        return frames if band is None else band.own_rows(frames)


def decode_latents(
    decoder: HunyuanVAEDecoder,
    latents: torch.Tensor,
    scaling_factor: float,
    group: GroupCoordinator | None = None,
) -> torch.Tensor:
    """latents [B, C, h, w] -> images [B, 3, H, W] in [0, 1] (fp32).

    z = latents / scaling_factor with a time axis T=1; of the ffactor_temporal frames the decoder makes, only
    the LAST is computed and kept; image = (x / 2 + 0.5).clamp(0, 1).

    group: spread the decode over its ranks (e.g. ``get_world_group()``): every rank passes the same latents and
    weights, decodes a horizontal band of the image (vae_band: exact halos, global GroupNorm statistics), and
    gets the whole image back (all-gathered), equal to the one-rank decode up to fp32 rounding. None, a
    one-rank group, or a latent with fewer rows than ranks: each rank decodes the whole image alone.
    """
    if latents.dim() != 4:
        raise ValueError(f"latents must be [B, C, h, w], got shape {tuple(latents.shape)}")
    dtype = next(decoder.parameters()).dtype
    z = (latents / scaling_factor).to(dtype).unsqueeze(2)
    height, width = latents.shape[-2:]
    if group is None or not 1 < group.world_size <= height:
        frame = decoder(z, last_frame_only=True)[:, :, 0]
        return (frame.float() / 2 + 0.5).clamp(0, 1).contiguous()
    band = HunyuanVAEBand.for_rank(decoder, group, height, width)
    frame = decoder(z, band=band, last_frame_only=True)[:, :, 0]
    return band.gather_image((frame.float() / 2 + 0.5).clamp(0, 1))
