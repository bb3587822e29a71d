"""The VAE decoder's Conv3d (odd kernel k_t x k_h x k_w, zero padding k // 2 on every axis) as 2D convolutions.

Shape legend: B batch, C / C_out channels, T frames, h x w spatial size, K = k_t time taps, p = k_t // 2.

Output frame t is the sum over taps j of conv2d(x[:, :, t + j - p], weight[:, :, j]); taps that fall past either
end meet the zero padding and add nothing. So:
- one output frame (a T = 1 input, or only the last frame wanted): ONE conv2d over its real taps stacked as
  input channels. On a T = 1 input only the middle tap is real: a conv2d with weight[:, :, p] (x not copied).
- every frame of a T > 1 input, two formulations of the same products (summed in another order, so fp32 results
  differ by ~1e-7 relative):
  "conv3d": F.conv3d (cuDNN's 3D kernels; on CPU oneDNN's, called directly);
  "stacked_conv2d": the K taps of every output frame stacked as K*C input channels (zeros past the ends),
  [B*T, K*C, h, w], against the weight permuted to [C_out, K*C, k_h, k_w]: one conv2d over all B*T frames.
Which one is faster depends on the device and the shapes: benchmarks/bench_vae.py measures it.

Layouts: contiguous or channels_last_3d x ([B, T, h, w, C] in memory) both work. The stacked input follows
x's layout, so under channels_last_3d the conv2d runs channels-last and its output [B*T, h, w, C_out] is already
channels_last_3d [B, C_out, T, h, w] (a view); from a contiguous x it comes back as [B, T, C_out, h, w] in memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

TIME_CONVS = ("conv3d", "stacked_conv2d")

# (time_conv, channels_last) of the decoder when none is set, per device type, from benchmarks/bench_vae.py;
# other devices get ("conv3d", False). CPU: oneDNN's conv3d beats the stacked conv2d at every conv of the tiny
# decoder; channels-last saves ~5% there but doubles the real decoder's time at small latents (per-call weight
# reorders), so contiguous.
PREFERRED_KERNELS = {"cpu": ("conv3d", False)}


def preferred_kernels(device: torch.device) -> tuple[str, bool]:
    return PREFERRED_KERNELS.get(device.type, ("conv3d", False))


def channels_innermost(x: torch.Tensor) -> bool:
    """True for [B, C, T, h, w] laid out as [B, T, h, w, C] in memory (channels_last_3d, or a row slice of it)."""
    return x.stride(1) < x.stride(-1)


def _conv2d_over_taps(x_2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, taps: slice) -> torch.Tensor:
    """x_2d [N, n*C, h, w] (n taps stacked tap-major) -> [N, C_out, h, w], weight [C_out, C, K, k_h, k_w] taken as
    [C_out, n*C, k_h, k_w] over its taps ``taps`` (a copy of the weight)."""
    w = weight[:, :, taps]
    w_2d = w.transpose(1, 2).reshape(w.shape[0], -1, *w.shape[3:])
    return F.conv2d(x_2d, w_2d, bias, padding=(w.shape[3] // 2, w.shape[4] // 2))


def _frame_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, t: int) -> torch.Tensor:
    """x [B, C, T, h, w] -> output frame t, [B, C_out, 1, h, w]: one conv2d over frame t's real taps."""
    T, K = x.shape[2], weight.shape[2]
    p = K // 2
    first, stop = max(0, p - t), min(K, T + p - t)  # taps that meet a real frame
    frames = x[:, :, t + first - p : t + stop - p]  # [B, C, n, h, w]
    x_2d = frames[:, :, 0] if stop - first == 1 else frames.transpose(1, 2).flatten(1, 2)  # [B, n*C, h, w]
    return _conv2d_over_taps(x_2d, weight, bias, slice(first, stop)).unsqueeze(2)


def _stacked_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [B, C, T, h, w] -> [B, C_out, T, h, w] by one conv2d over [B*T, K*C, h, w] (taps stacked as channels)."""
    B, C, T, H, W = x.shape
    K = weight.shape[2]
    p = K // 2
    if channels_innermost(x):  # memory [B, T, h, w, K, C]: the conv2d input is channels-last
        stacked = x.new_empty(B, T, H, W, K, C).permute(0, 1, 4, 5, 2, 3)
    else:  # memory [B, T, K, C, h, w]
        stacked = x.new_empty(B, T, K, C, H, W)
    frames = x.transpose(1, 2)  # [B, T, C, h, w]
    for j in range(K):  # stacked[:, t, j] = frame t + j - p, zero past the ends
        lo, hi = max(0, p - j), min(T, T + p - j)
        stacked[:, lo:hi, j] = frames[:, lo + j - p : hi + j - p]
        stacked[:, :lo, j] = 0
        stacked[:, hi:, j] = 0
    out = _conv2d_over_taps(stacked.flatten(0, 1).flatten(1, 2), weight, bias, slice(None))  # [B*T, C_out, h, w]
    return out.unflatten(0, (B, T)).transpose(1, 2)


def conv3d_frames(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    time_conv: str,
    last_frame_only: bool = False,
) -> torch.Tensor:
    """F.conv3d(x, weight, bias, padding=k // 2): x [B, C, T, h, w] -> [B, C_out, T, h, w] (T' = 1 with
    last_frame_only: only frame T - 1 is computed). Odd kernel sizes (the decoder's are 3 and 1)."""
    T = x.shape[2]
    if T == 1 or last_frame_only:
        return _frame_conv2d(x, weight, bias, T - 1)
    if time_conv == "conv3d":
        padding = [k // 2 for k in weight.shape[2:]]
        if x.is_cpu and x.dtype == torch.float32 and torch.backends.mkldnn.is_available():
            # F.conv3d sends fp32 CPU inputs with B*C*T*h <= 20480 to an im2col kernel 3-8x slower than oneDNN's.
            return torch.ops.aten.mkldnn_convolution(x, weight, bias, padding, [1, 1, 1], [1, 1, 1], 1)
        return F.conv3d(x, weight, bias, padding=padding)
    if time_conv == "stacked_conv2d":
        return _stacked_conv2d(x, weight, bias)
    raise ValueError(f"time_conv must be one of {TIME_CONVS}, got {time_conv!r}")
