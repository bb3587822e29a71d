import pytest
import torch
import torch.nn.functional as F

from omni_ep.models.hunyuan_image3.vae import (
    HunyuanVAEAttnBlock,
    HunyuanVAEDecoder,
    HunyuanVAEUpsample,
    decode_latents,
    depth_to_space,
)

pytestmark = pytest.mark.timeout(120)

REAL_VAE_CONFIG = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 32, "block_out_channels": [128, 256, 512, 1024, 1024],
    "layers_per_block": 2, "ffactor_spatial": 16, "ffactor_temporal": 4, "scaling_factor": 0.562679178327931,
    "downsample_match_channel": True, "upsample_match_channel": True,
}  # fmt: skip
TINY = dict(latent_channels=32, block_out_channels=(32, 64, 64), layers_per_block=1, ffactor_spatial=4, ffactor_temporal=2)


def test_real_config_keys_shapes_and_output_shape():
    with torch.device("meta"):
        decoder = HunyuanVAEDecoder.from_vae_config(REAL_VAE_CONFIG)
        frames = decoder(torch.empty(1, 32, 1, 3, 5))
    assert frames.shape == (1, 3, 4, 48, 80)  # T=1 -> 4 frames, 16x space
    shapes = {k: tuple(v.shape) for k, v in decoder.state_dict().items()}
    assert shapes["conv_in.weight"] == (1024, 32, 3, 3, 3)
    for name in ("q", "k", "v", "proj_out"):
        assert shapes[f"mid.attn_1.{name}.weight"] == (1024, 1024, 1, 1, 1)
    assert shapes["mid.attn_1.norm.weight"] == (1024,)
    for block in ("mid.block_1", "mid.block_2", "up.0.block.2", "up.4.block.0"):
        assert {f"{block}.{p}.weight" for p in ("norm1", "conv1", "norm2", "conv2")} <= shapes.keys()
    # levels 0, 1 upsample time too (f = 8); levels 2, 3 space only (f = 4); level 4 none.
    assert shapes["up.0.upsample.conv.weight"] == (1024 * 8, 1024, 3, 3, 3)
    assert shapes["up.1.upsample.conv.weight"] == (512 * 8, 1024, 3, 3, 3)
    assert shapes["up.2.upsample.conv.weight"] == (256 * 4, 512, 3, 3, 3)
    assert shapes["up.3.upsample.conv.weight"] == (128 * 4, 256, 3, 3, 3)
    assert not any(k.startswith("up.4.upsample") or ".block.3." in k for k in shapes)
    assert shapes["up.4.block.2.conv2.weight"] == (128, 128, 3, 3, 3)
    assert shapes["norm_out.weight"] == (128,) and shapes["conv_out.weight"] == (3, 128, 3, 3, 3)
    assert not any("nin_shortcut" in k for k in shapes)  # matched channels: no level changes width inside
    norms = [m for m in decoder.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.num_groups == 32 and m.eps == 1e-6 for m in norms)
    convs = [m for m in decoder.modules() if isinstance(m, torch.nn.Conv3d)]
    assert all(m.padding == tuple(k // 2 for k in m.kernel_size) for m in convs)


def test_temporal_upsample_depth_to_space_known_numbers():
    # 2 -> 1 channels with time: conv zeroed, so the output is the shortcut: x repeated 4x per channel,
    # channel index r1*4 + r2*2 + r3 -> frame 2f + r1 reads x[:, r1], every 2x2 pixel block copies x.
    up = HunyuanVAEUpsample(2, 1, temporal=True)
    with torch.no_grad():
        up.conv.weight.zero_()
        up.conv.bias.zero_()
    x = torch.arange(8.0).view(1, 2, 1, 2, 2)  # channel 0: [[0,1],[2,3]], channel 1: [[4,5],[6,7]]
    out = up(x)
    assert out.shape == (1, 1, 2, 4, 4)
    assert out[0, 0, 0].tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]
    assert out[0, 0, 1].tolist() == [[4, 4, 5, 5], [4, 4, 5, 5], [6, 6, 7, 7], [6, 6, 7, 7]]


def test_spatial_upsample_is_pixel_shuffle_for_one_channel():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 3, 2, 5)
    out = depth_to_space(x, 1, 2)
    expect = F.pixel_shuffle(x.transpose(1, 2).reshape(6, 4, 2, 5), 2).reshape(2, 3, 1, 4, 10).transpose(1, 2)
    torch.testing.assert_close(out, expect, rtol=0, atol=0)
    up = HunyuanVAEUpsample(32, 32, temporal=False)  # repeats 4*32/32 = 4
    assert up(torch.randn(1, 32, 2, 3, 3)).shape == (1, 32, 2, 6, 6)
    with pytest.raises(ValueError, match="divisible"):
        HunyuanVAEUpsample(64, 24, temporal=False)


def test_mid_attention_spans_all_frames_and_pixels():
    # q = k = 0 gives uniform weights; v = proj_out = identity: out = x + mean over all T*h*w of GN(x).
    attn = HunyuanVAEAttnBlock(32)
    with torch.no_grad():
        for conv in (attn.q, attn.k, attn.v, attn.proj_out):
            conv.weight.zero_()
            conv.bias.zero_()
        for c in range(32):
            attn.v.weight[c, c] = 1.0
            attn.proj_out.weight[c, c] = 1.0
    x = torch.randn(2, 32, 3, 2, 2)
    mean = F.group_norm(x, 32, eps=1e-6).mean(dim=(2, 3, 4), keepdim=True)
    torch.testing.assert_close(attn(x), x + mean.expand_as(x), rtol=1e-5, atol=1e-5)


def test_tiny_decoder_shapes_and_last_frame():
    torch.manual_seed(0)
    decoder = HunyuanVAEDecoder(**TINY)
    assert decoder.conv_in.weight.shape == (64, 32, 3, 3, 3)
    assert decoder.up[0].upsample.conv.weight.shape == (64 * 8, 64, 3, 3, 3)  # time + space
    assert decoder.up[1].upsample.conv.weight.shape == (32 * 4, 64, 3, 3, 3)  # space, to the next width
    unmatched = HunyuanVAEDecoder(**TINY, upsample_match_channel=False)  # width changes inside level 2
    assert unmatched.state_dict()["up.2.block.0.nin_shortcut.weight"].shape == (32, 64, 1, 1, 1)
    assert unmatched(torch.randn(1, 32, 1, 2, 2)).shape == (1, 3, 2, 8, 8)
    latents = torch.randn(2, 32, 3, 4)
    frames = decoder(latents[:, :, None] / 0.5)
    assert frames.shape == (2, 3, 2, 12, 16)
    assert not torch.allclose(frames[:, :, 0], frames[:, :, 1])
    images = decode_latents(decoder, latents, scaling_factor=0.5)
    assert images.shape == (2, 3, 12, 16) and images.dtype == torch.float32
    torch.testing.assert_close(images, (frames[:, :, -1] / 2 + 0.5).clamp(0, 1))
    assert images.min() >= 0 and images.max() <= 1


def test_bad_configs_and_inputs():
    with pytest.raises(ValueError, match="at least 4 entries"):
        HunyuanVAEDecoder(block_out_channels=(32, 64, 64), ffactor_spatial=8)
    with pytest.raises(ValueError, match="power of two"):
        HunyuanVAEDecoder(**{**TINY, "ffactor_temporal": 3})
    with pytest.raises(ValueError, match="multiple of 32"):
        HunyuanVAEDecoder(**{**TINY, "block_out_channels": (48, 64, 64)})
    decoder = HunyuanVAEDecoder(**TINY)
    with pytest.raises(ValueError, match="time axis"):
        decoder(torch.randn(1, 32, 4, 4))
