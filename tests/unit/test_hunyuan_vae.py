import dataclasses

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
from omni_ep.models.hunyuan_image3.vae_band import HunyuanVAEBand, band_halos
from omni_ep.models.hunyuan_image3.vae_conv import TIME_CONVS, conv3d_frames
from tests.launcher import run_ranks
from tests.unit.hunyuan_reference import reference_vae_decode

pytestmark = pytest.mark.timeout(120)


REAL_VAE_CONFIG = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 32, "block_out_channels": [128, 256, 512, 1024, 1024],
    "layers_per_block": 2, "ffactor_spatial": 16, "ffactor_temporal": 4, "scaling_factor": 0.562679178327931,
    "downsample_match_channel": True, "upsample_match_channel": True,
}  # fmt: skip
TINY = dict(latent_channels=32, block_out_channels=(32, 64, 64), layers_per_block=1, ffactor_spatial=4, ffactor_temporal=2)
TINY_CHECKPOINT_VAE = dict(block_out_channels=(32, 32, 32, 64, 64))  # the real layout at widths 32..64
KERNELS = [(time_conv, channels_last) for time_conv in TIME_CONVS for channels_last in (False, True)]


def relative_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x - ref).abs().max() / ref.abs().max()).item()


@pytest.fixture(autouse=True)
def one_thread():
    """These small convs run fastest on one thread, and two threads crawl when another process shares the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
    with pytest.raises(ValueError, match="time_conv"):
        decoder.set_kernels("fft")


@pytest.mark.parametrize("T", [1, 2, 3, 4])
@pytest.mark.parametrize("kernel", [3, 1])
@pytest.mark.parametrize("time_conv,channels_last", KERNELS)
def test_conv3d_frames_is_conv3d(T, kernel, time_conv, channels_last):
    gen = torch.Generator().manual_seed(T * 10 + kernel)
    x = torch.randn(2, 8, T, 5, 6, generator=gen)
    weight, bias = torch.randn(4, 8, kernel, kernel, kernel, generator=gen), torch.randn(4, generator=gen)
    expect = F.conv3d(x, weight, bias, padding=kernel // 2)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    out = conv3d_frames(x, weight, bias, time_conv)
    assert out.shape == expect.shape and relative_error(out, expect) < 1e-6
    last = conv3d_frames(x, weight, bias, time_conv, last_frame_only=True)
    assert last.shape == (2, 4, 1, 5, 6) and relative_error(last, expect[:, :, -1:]) < 1e-6
    if T == 1:  # only the middle time tap meets a frame: exactly a conv2d
        conv2d = F.conv2d(x[:, :, 0], weight[:, :, kernel // 2], bias, padding=kernel // 2)
        torch.testing.assert_close(out[:, :, 0], conv2d, rtol=0, atol=0)


@pytest.fixture(scope="module")
def section6_decodes():
    """(config, weights, latents, every frame of the plain Conv3d decode) of the tiny checkpoint's decoder and of
    one whose width changes inside a level (nin_shortcut) and whose time grows x2, decoded once per module."""
    torch.manual_seed(0)
    cases = []
    for config, temporal, latent_shape in ((TINY_CHECKPOINT_VAE, 4, (2, 32, 3, 5)),
                                           ({**TINY, "upsample_match_channel": False}, 2, (1, 32, 3, 2))):
        weights = HunyuanVAEDecoder(**config).state_dict()
        latents = torch.randn(latent_shape)
        with torch.no_grad():
            frames = reference_vae_decode(weights, latents[:, :, None] / 0.5, temporal)
        cases.append((config, weights, latents, frames))
    return cases


@pytest.mark.parametrize("time_conv,channels_last", KERNELS)
def test_decoder_matches_section6_reference(section6_decodes, time_conv, channels_last):
    """Every frame and the decoded image against the plain Conv3d decode, for each kernel choice; the weights
    load by their nn.Conv3d / nn.GroupNorm names."""
    for config, weights, latents, frames in section6_decodes:
        decoder = HunyuanVAEDecoder(**config).eval()
        decoder.load_state_dict(weights)
        decoder.set_kernels(time_conv, channels_last)
        with torch.no_grad():
            assert relative_error(decoder(latents[:, :, None] / 0.5), frames) < 1e-5
            image = decode_latents(decoder, latents, scaling_factor=0.5)
        assert relative_error(image, (frames[:, :, -1] / 2 + 0.5).clamp(0, 1)) < 1e-5


@pytest.mark.slow
def test_real_config_decoder_matches_section6_reference():
    with torch.device("meta"):
        decoder = HunyuanVAEDecoder.from_vae_config(REAL_VAE_CONFIG)
    decoder = decoder.to_empty(device="cpu").eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in decoder.named_parameters():  # nn.Conv3d's default bound; GroupNorm weights around 1
            p.uniform_(-(p[0].numel() ** -0.5) if p.dim() > 1 else -0.5, p[0].numel() ** -0.5 if p.dim() > 1 else 0.5,
                       generator=gen)
            if "norm" in name and name.endswith("weight"):
                p.add_(1)
        latents = torch.randn(1, 32, 3, 5, generator=gen)
        frames = reference_vae_decode(decoder.state_dict(), latents[:, :, None] / 0.5, 4)
        for time_conv in TIME_CONVS:
            image = decode_latents(decoder.set_kernels(time_conv), latents, scaling_factor=0.5)
            assert relative_error(image, (frames[:, :, -1] / 2 + 0.5).clamp(0, 1)) < 1e-5


def test_band_halos_from_module_structure():
    with torch.device("meta"):
        real = HunyuanVAEDecoder.from_vae_config(REAL_VAE_CONFIG)
    # backwards from conv_out (1 row): 6 convs a level, ceil(h / 2) + 1 through every upsample.
    assert band_halos(real) == {16: 7, 8: 11, 4: 13, 2: 14, 1: 14}
    with torch.device("meta"):
        unmatched = HunyuanVAEDecoder(**TINY, upsample_match_channel=False)  # 2 blocks a level, 2 upsamples
    assert band_halos(unmatched) == {4: 5, 2: 8, 1: 9}


@dataclasses.dataclass(frozen=True)
class EdgePoisonedBand(HunyuanVAEBand):
    """A band whose outermost window rows inside the image are NaN from the start of the level of scale
    poison_scale on: the band of one halo row fewer there, with every value that row reaches turned NaN."""

    poison_scale: int = 0

    def enter(self, x, rows_start):
        x = super().enter(x, rows_start)
        s = self._scale(x)
        if s != self.poison_scale:
            return x
        start, stop = self.window(s)
        x = x.clone()
        if start > 0:
            x[..., 0, :] = float("nan")
        if stop < self.height * s:
            x[..., -1, :] = float("nan")
        return x


def _split_decode_worker(rank, world_size, cases, tight_halo_latent):
    """Per case: max |split decode - one-rank decode| relative to the image; then (tight_halo_latent) the scales s
    at which an edge row poisoned (one halo row fewer) reaches the image."""
    from omni_ep.config import ParallelConfig
    from omni_ep.distributed import destroy_parallel_state, get_world_group, init_parallel_state

    init_parallel_state(ParallelConfig(data_parallel_size=world_size))
    group = get_world_group()
    errors, poison_reaches_image = [], []
    with torch.no_grad():
        for config, latent_shape, time_conv, channels_last in cases:
            torch.manual_seed(0)
            decoder = HunyuanVAEDecoder(**config).eval().set_kernels(time_conv, channels_last)
            latents = torch.randn(latent_shape)
            one = decode_latents(decoder, latents, 0.5)
            errors.append(relative_error(decode_latents(decoder, latents, 0.5, group=group), one))
        if tight_halo_latent is not None:
            torch.manual_seed(0)
            decoder = HunyuanVAEDecoder(**TINY_CHECKPOINT_VAE).eval()
            latents = torch.randn(tight_halo_latent)
            band = HunyuanVAEBand.for_rank(decoder, group, *latents.shape[-2:])
            for s in band.halos:
                poisoned = EdgePoisonedBand(**{f.name: getattr(band, f.name) for f in dataclasses.fields(band)},
                                            poison_scale=s)
                frame = decoder((latents / 0.5)[:, :, None], band=poisoned, last_frame_only=True)[:, :, 0]
                if poisoned.gather_image(frame).isnan().any():
                    poison_reaches_image.append(s)
    destroy_parallel_state()
    return errors, poison_reaches_image


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 3])
def test_split_decode_equals_one_rank_decode(world_size):
    """Bands of odd heights (5 rows over 2 ranks: 3 + 2; 7 over 3: 3 + 2 + 2), batch 2, every kernel choice, a
    width change inside a level, fewer latent rows than ranks (whole decode on every rank). With 2 ranks the
    halos are also shown tight: the row at a window's edge inside the image, poisoned with NaN at the start of
    any level, reaches the image (convs spread it a row each, GroupNorm statistics once it is in own rows)."""
    cases = [(TINY_CHECKPOINT_VAE, (1, 32, 5 + 2 * (world_size - 2), 3), *kernels) for kernels in KERNELS]
    cases += [(TINY_CHECKPOINT_VAE, (2, 32, 7, 2), "conv3d", False),
              ({**TINY, "upsample_match_channel": False}, (1, 32, 9, 4), "stacked_conv2d", True),
              (TINY_CHECKPOINT_VAE, (1, 32, world_size - 1, 2), "conv3d", False)]
    # 29 latent rows: rank 1 owns rows 15..28, so its window starts inside the image at every scale.
    tight_halo_latent = (1, 32, 29, 1) if world_size == 2 else None
    results = run_ranks(_split_decode_worker, world_size, cases, tight_halo_latent, timeout=240)
    for errors, poison_reaches_image in results:
        assert max(errors) < 1e-5, errors
        if world_size == 2:
            assert sorted(poison_reaches_image) == [1, 2, 4, 8, 16]
