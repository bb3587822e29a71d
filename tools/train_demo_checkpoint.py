"""Train the demo checkpoint: HunyuanImage-3.0 at toy size, in the released layout, on images scikit-image ships.

    pip install -e ".[train]" && python tools/train_demo_checkpoint.py checkpoints/hunyuan-image3-demo

Stages: 1. the images and their captions (``DEMO_IMAGES``, centre-cropped to 64 x 64); 2. a VAE fitted to them
(an encoder for training only, and the decoder the pipeline reads; L1 + MSE + SSIM); 3. their latents; 4. the
transformer, by flow matching (velocity = noise - latents, shifted sigmas as at inference, 10 % of the rows on the
caption-free ``<cfg>`` row for guidance); 5. the checkpoint in bf16 under the released names (``vae.encoder.*``
included); 6. each prompt through ``HunyuanImage3Pipeline`` from the written files at the generation config's
steps and guidance, its SSIM against its training image, and a preview grid.

The model is the real architecture (omni_ep's own transformer and VAE decoder, trained through autograd) at toy
size: hidden 64, 2 layers, 8 experts top-2, patch_embed width 32; a one-frame VAE (``ffactor_temporal`` 1) of
widths 32 and spatial factor 4: 64 x 64 pictures from 16 x 16 latents (256 image tokens). Sizes chosen for a
2-core CPU. Seeded: the same torch version, thread count and machine give the same file. Runtime on a busy 2-core
CPU: about 10 minutes for the VAE (400 steps) and 10 for the transformer (4000 steps, batched); ``--device cuda``
is meant for one GPU (not tried yet).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import tempfile
import time

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from torch import nn

from omni_ep.models.hunyuan_image3 import HunyuanImage3Config, HunyuanImage3VAEConfig, load_transformer
from omni_ep.models.hunyuan_image3.make_tiny_checkpoint import tiny_config, write_tiny_checkpoint
from omni_ep.models.hunyuan_image3.saving import save_checkpoint
from omni_ep.models.hunyuan_image3.tokenization import build_text_to_image_inputs
from omni_ep.models.hunyuan_image3.vae import HunyuanVAEDecoder, HunyuanVAEResnetBlock, HunyuanVAEAttnBlock, _conv, _group_norm

logger = logging.getLogger("omni_ep.tools.train_demo_checkpoint")

IMAGE_SIZE = 64
# (scikit-image sample, caption): the prompts the demo checkpoint knows. Seven words each, one token a word with
# the demo tokenizer, so all captions share one token layout and train as one batch.
DEMO_IMAGES = (
    ("coffee", "a cup of coffee on the table"),
    ("chelsea", "a ginger cat with big green eyes"),
    ("astronaut", "an astronaut in a white space suit"),
    ("rocket", "a space rocket on its launch pad"),
    ("camera", "black and white photo of a cameraman"),
    ("colorwheel", "a round wheel of all the colours"),
)


def demo_config() -> HunyuanImage3Config:
    """The tiny architecture with a 64-pixel base size and a one-frame VAE of spatial factor 4."""
    config = tiny_config()
    config.image_base_size = IMAGE_SIZE
    config.vae_downsample_factor = [4, 4]
    config.vae = HunyuanImage3VAEConfig(
        block_out_channels=[32, 32, 32], layers_per_block=1, ffactor_spatial=4, ffactor_temporal=1,
        extra={"_class_name": "AutoencoderKLConv3D", "sample_size": IMAGE_SIZE, "sample_tsize": 1},
    )
    config.validate()
    return config


def demo_image(name: str, size: int = IMAGE_SIZE) -> np.ndarray:
    """scikit-image's sample ``name``, centre-cropped to a square, resized (Lanczos) to size x size: [size, size, 3]
    float64 in [0, 1]. The training target of its caption."""
    import skimage.data

    pixels = getattr(skimage.data, name)()
    image = PIL.Image.fromarray(pixels).convert("RGB")
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    image = image.crop((left, top, left + side, top + side)).resize((size, size), PIL.Image.LANCZOS)
    return np.asarray(image, dtype=np.float64) / 255.0


# ---- the VAE encoder (training only) --------------------------------------------------------------------------
def space_to_depth(x: torch.Tensor) -> torch.Tensor:
    """[B, c, T, 2h, 2w] -> [B, (2 2 c), T, h, w], the inverse of the decoder's depth_to_space(x, 1, 2)."""
    B, c, T, H, W = x.shape
    x = x.reshape(B, c, T, H // 2, 2, W // 2, 2).permute(0, 4, 6, 1, 2, 3, 5)  # B r_h r_w c T h w
    return x.reshape(B, 4 * c, T, H // 2, W // 2)


class HunyuanVAEDownsample(nn.Module):
    """x [B, C_in, T, 2h, 2w] -> [B, C_out, T, h, w]: space_to_depth(conv(x)) + space_to_depth(x) averaged over
    groups of 4 C_in / C_out channels (the decoder's upsample, mirrored)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = _conv(in_channels, out_channels // 4, 3)
        self.group = 4 * in_channels // out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = space_to_depth(x)
        B, C, T, h, w = shortcut.shape
        return space_to_depth(self.conv(x)) + shortcut.reshape(B, C // self.group, self.group, T, h, w).mean(2)


class HunyuanVAEEncoder(nn.Module):
    """image [B, 3, T, H, W] -> (mean, logvar) [B, latent_channels, T, H/f, W/f]; the released ``vae.encoder.*``
    names (conv_in, down.{i}.block.{j}, down.{i}.downsample, mid, norm_out, conv_out). Needed only to train."""

    def __init__(self, vae: HunyuanImage3VAEConfig):
        super().__init__()
        channels, levels = vae.block_out_channels, int(math.log2(vae.ffactor_spatial))
        self.conv_in = _conv(vae.in_channels, channels[0], 3)
        self.down = nn.ModuleList()
        block_in = channels[0]
        for level, block_out in enumerate(channels):
            down = nn.Module()
            down.block = nn.ModuleList()
            for _ in range(vae.layers_per_block):
                down.block.append(HunyuanVAEResnetBlock(block_in, block_out))
                block_in = block_out
            if level < levels:
                down.downsample = HunyuanVAEDownsample(block_in, channels[level + 1])
                block_in = channels[level + 1]
            self.down.append(down)
        self.mid = nn.Module()
        self.mid.block_1 = HunyuanVAEResnetBlock(block_in, block_in)
        self.mid.attn_1 = HunyuanVAEAttnBlock(block_in)
        self.mid.block_2 = HunyuanVAEResnetBlock(block_in, block_in)
        self.norm_out = _group_norm(block_in)
        self.conv_out = _conv(block_in, 2 * vae.latent_channels, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.conv_in(x)
        for down in self.down:
            for block in down.block:
                h = block(h)
            if hasattr(down, "downsample"):
                h = down.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        mean, logvar = self.conv_out(F.silu(self.norm_out(h))).chunk(2, dim=1)
        return mean, logvar.clamp(-30, 20)


def zero_unused_time_taps(module: nn.Module) -> nn.Module:
    """Zero the outer time taps of every Conv3d in ``module``: one frame only meets them as zero padding (the
    convs run as 2D convs with the middle taps), so training leaves them as drawn; zeroed, the stored kernels
    also mean a per-frame image model on several frames."""
    with torch.no_grad():
        for conv in module.modules():
            if isinstance(conv, nn.Conv3d) and conv.kernel_size[0] > 1:
                middle = conv.kernel_size[0] // 2
                conv.weight[:, :, :middle].zero_()
                conv.weight[:, :, middle + 1 :].zero_()
    return module


# ---- training -------------------------------------------------------------------------------------------------
def cosine_lr(step: int, steps: int, peak: float, warmup: int = 50) -> float:
    return peak * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))


def ssim_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """1 - SSIM of image batches [B, C, H, W] in [0, 1] (11 x 11 Gaussian window, sigma 1.5, per channel), the
    measure the demo is judged by; differentiable."""
    g = torch.exp(-((torch.arange(11, dtype=x.dtype, device=x.device) - 5) ** 2) / (2 * 1.5**2))
    window = ((g[:, None] * g[None, :]) / g.sum() ** 2)[None, None].repeat(x.shape[1], 1, 1, 1)
    blur = lambda t: F.conv2d(t, window, groups=x.shape[1])  # noqa: E731 - valid region only
    mu_x, mu_y = blur(x), blur(y)
    var_x, var_y, cov = blur(x * x) - mu_x**2, blur(y * y) - mu_y**2, blur(x * y) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    ssim = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return 1 - ssim.mean()


def train_vae(images_B3HW: torch.Tensor, vae: HunyuanImage3VAEConfig, steps: int, device: torch.device,
              crop_share: float = 0.0):
    """Fit encoder + decoder to the images (L1 + MSE + SSIM on the decoded frame, a small KL), the first
    ``crop_share`` of the steps on random half-size windows, the rest on whole images. Returns both."""
    encoder = zero_unused_time_taps(HunyuanVAEEncoder(vae)).to(device)
    decoder = zero_unused_time_taps(HunyuanVAEDecoder.from_vae_config(vae.to_dict())).to(device)
    params = [*encoder.parameters(), *decoder.parameters()]
    optimizer = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.0)
    images = images_B3HW.to(device).unsqueeze(2) * 2 - 1  # [B, 3, 1, H, W] in [-1, 1]
    size, factor = images.shape[-1], vae.ffactor_spatial
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, steps, 2e-3)
        x = images
        if step < crop_share * steps:  # a random half-size window (on the latent grid): 4x cheaper steps
            top, left = (factor * int(i) for i in torch.randint(0, (size // 2) // factor + 1, (2,), generator=generator))
            x = images[..., top : top + size // 2, left : left + size // 2]
        mean, logvar = encoder(x)
        z = mean + torch.randn_like(mean) * (0.5 * logvar).exp()
        recon = decoder(z)[:, :, -1:]
        kl = 0.5 * (mean.square() + logvar.exp() - 1 - logvar).mean()
        loss = (recon - x).abs().mean() + (recon - x).square().mean() + 1e-4 * kl
        loss = loss + ssim_loss(recon[:, :, 0] / 2 + 0.5, x[:, :, 0] / 2 + 0.5)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if step % 100 == 0 or step == steps - 1:
            logger.info("vae step %d/%d: loss %.4f (kl %.3f), %.0f s", step + 1, steps, loss.item(), kl.item(),
                        time.perf_counter() - start)
    return encoder.eval(), decoder.eval()


def train_transformer(transformer, tokenizer, config, latents_BChw, captions, steps, device, rows=4, lr=2e-3, seed=0):
    """Flow matching on the fixed latents: x_s = (1 - s) x0 + s noise, target velocity noise - x0, t = s * 1000
    with s from the inference schedule's shifted distribution; ``rows`` noise draws per caption, 10 % of them on the
    caption-free ``<cfg>`` row. Captions of one token length share a forward (the batch of their rows)."""
    for p in transformer.parameters():
        p.requires_grad_(True)
    transformer.train()
    params = list(transformer.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    shift = 3.0
    inputs = [build_text_to_image_inputs(tokenizer, [c], IMAGE_SIZE, IMAGE_SIZE, True, config.image_base_size,
                                         config.vae_downsample_factor[0]) for c in captions]
    groups: dict[int, list[int]] = {}
    for i, inp in enumerate(inputs):
        groups.setdefault(inp.input_ids.shape[1], []).append(i)
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, steps, lr)
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for members in groups.values():
            n = len(members) * rows
            u = torch.rand(n, generator=generator)
            sigma = (shift * u / (1 + (shift - 1) * u))[:, None, None, None]
            noise = torch.randn(n, *latents_BChw.shape[1:], generator=generator)
            x0 = latents_BChw[members].repeat_interleave(rows, dim=0)
            uncond = torch.rand(n, generator=generator) < 0.1
            cond_ids = torch.stack([inputs[i].input_ids[0] for i in members]).repeat_interleave(rows, dim=0)
            uncond_ids = torch.stack([inputs[i].input_ids[1] for i in members]).repeat_interleave(rows, dim=0)
            ids = torch.where(uncond[:, None], uncond_ids, cond_ids)
            first = inputs[members[0]]
            v = transformer(((1 - sigma) * x0 + sigma * noise).to(device), (sigma.flatten() * 1000).to(device),
                            slice(*first.image_slice), first.timestep_index, input_ids=ids.to(device))
            loss = (v.float() - (noise - x0).to(device)).square().mean() * n / (len(captions) * rows)
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if step % 100 == 0 or step == steps - 1:
            logger.info("transformer step %d/%d: loss %.4f, %.0f s", step + 1, steps, total, time.perf_counter() - start)
    for p in transformer.parameters():
        p.requires_grad_(False)
    return transformer.eval()


def load_vae(path: str, vae: HunyuanImage3VAEConfig, device: torch.device):
    """Encoder and decoder from the ``vae.encoder.*`` / ``vae.decoder.*`` tensors of a demo checkpoint, in fp32."""
    from omni_ep.models.hunyuan_image3.loading import SafetensorsCheckpoint

    checkpoint = SafetensorsCheckpoint(path)
    encoder, decoder = HunyuanVAEEncoder(vae), HunyuanVAEDecoder.from_vae_config(vae.to_dict())
    for prefix, module in (("vae.encoder.", encoder), ("vae.decoder.", decoder)):
        module.load_state_dict({n[len(prefix):]: checkpoint.read(n).float() for n in checkpoint.names()
                                if n.startswith(prefix)})
    return encoder.to(device).eval(), decoder.to(device).eval()


# ---- the checkpoint, and a check through the pipeline -----------------------------------------------------
def image_ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Wang et al.'s SSIM (11 x 11 Gaussian window, sigma 1.5) of two [H, W, 3] images in [0, 1], as
    tests/e2e/image_quality.py computes it."""
    from skimage.metrics import structural_similarity

    return float(structural_similarity(a, b, channel_axis=2, data_range=1.0, gaussian_weights=True, sigma=1.5,
                                       use_sample_covariance=False))


def write_model_card(directory: str, argv: list[str]) -> None:
    prompts = "\n".join(f"- `{caption}` (scikit-image `{name}`)" for name, caption in DEMO_IMAGES)
    with open(os.path.join(directory, "README.md"), "w") as f:
        f.write(
            "# HunyuanImage-3.0 demo checkpoint (toy size)\n\n"
            "The HunyuanImage-3.0 architecture at toy size, in the released layout (bf16 shards + index, "
            "`vae.decoder.*` and `vae.encoder.*`), trained by\n\n"
            f"    python tools/train_demo_checkpoint.py {' '.join(argv)}\n\n"
            f"to draw these {IMAGE_SIZE} x {IMAGE_SIZE} pictures of scikit-image's data set from their captions:\n\n"
            f"{prompts}\n\nAny other prompt gives a blend of them. Not a general model.\n"
        )


def evaluate(directory: str, preview: str | None, device: torch.device) -> list[float]:
    """Each caption through the pipeline from the written files (the generation config's steps and guidance):
    SSIM against its training image; a grid (generated over trained) written to ``preview``."""
    from omni_ep.distributed import destroy_parallel_state
    from omni_ep.pipelines import HunyuanImage3Pipeline

    pipe = HunyuanImage3Pipeline.from_pretrained(directory, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    generated, scores = [], []
    for name, caption in DEMO_IMAGES:
        image = pipe(caption, height=IMAGE_SIZE, width=IMAGE_SIZE, seed=0, output_type="np").images[0]
        scores.append(image_ssim(image, demo_image(name)))
        generated.append(image)
        logger.info("%-40s SSIM %.3f", caption, scores[-1])
    destroy_parallel_state()
    if preview:
        grid = np.concatenate([np.concatenate(generated, 1), np.concatenate([demo_image(n) for n, _ in DEMO_IMAGES], 1)])
        PIL.Image.fromarray((grid * 255).round().astype(np.uint8)).save(preview)
        logger.info("wrote %s (top: generated, bottom: training images)", preview)
    return scores


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("directory", help="where to write the checkpoint (replaced)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random draw")
    parser.add_argument("--vae-steps", type=int, default=400, help="VAE optimiser steps (all images per step)")
    parser.add_argument("--steps", type=int, default=4000, help="transformer optimiser steps (all captions per step)")
    parser.add_argument("--vae-from", default=None,
                        help="take the VAE of an earlier run's checkpoint instead of training one (the same seed and "
                             "steps train the same VAE)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="training device")
    parser.add_argument("--preview", default=None, help="PNG grid of generated (top) and training (bottom) images")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    config = demo_config()
    captions = [caption for _, caption in DEMO_IMAGES]
    start = time.perf_counter()

    # 1. images
    images = torch.from_numpy(np.stack([demo_image(name) for name, _ in DEMO_IMAGES])).permute(0, 3, 1, 2).float()

    # 2. VAE, 3. latents (the encoder's means, scaled to unit variance; the scale goes into config.json)
    if args.vae_from:
        encoder, decoder = load_vae(args.vae_from, config.vae, device)
    else:
        encoder, decoder = train_vae(images, config.vae, args.vae_steps, device)
    with torch.no_grad():
        mean, _ = encoder(images.to(device).unsqueeze(2) * 2 - 1)
        recon = ((decoder(mean)[:, :, -1] / 2 + 0.5).clamp(0, 1)).permute(0, 2, 3, 1).double().cpu().numpy()
    logger.info("VAE reconstruction SSIM: %s", " ".join(f"{image_ssim(r, demo_image(n)):.3f}"
                                                         for r, (n, _) in zip(recon, DEMO_IMAGES)))
    config.vae.scaling_factor = float(1.0 / mean.std())
    latents = (mean[:, :, 0] * config.vae.scaling_factor).float().cpu()

    # 4. transformer: random init in the released layout, loaded through omni_ep's loader, trained in fp32
    with tempfile.TemporaryDirectory() as init_dir:
        write_tiny_checkpoint(init_dir, seed=args.seed, config=config, corpus=tuple(captions))
        from transformers import PreTrainedTokenizerFast

        tokenizer = PreTrainedTokenizerFast.from_pretrained(init_dir)
        transformer = load_transformer(init_dir, dtype=torch.float32, device=device)
        transformer = train_transformer(transformer, tokenizer, config, latents, captions, args.steps, device,
                                        seed=args.seed)
        from omni_ep.distributed import destroy_parallel_state

        destroy_parallel_state()  # the loader made the single-process state; evaluate makes its own

        # 5. the checkpoint: config and tokenizer as written for the init, weights in bf16
        os.makedirs(args.directory, exist_ok=True)
        for file in os.listdir(args.directory):
            os.remove(os.path.join(args.directory, file))
        for file in os.listdir(init_dir):
            if not file.endswith(".safetensors") and file != "model.safetensors.index.json":
                os.replace(os.path.join(init_dir, file), os.path.join(args.directory, file))
    config.to_json_file(os.path.join(args.directory, "config.json"))
    encoder_tensors = {f"vae.encoder.{n}": t for n, t in encoder.state_dict().items()}
    save_checkpoint(transformer, decoder, args.directory, dtype=torch.bfloat16, extra_tensors=encoder_tensors)
    write_model_card(args.directory, sys.argv[1:] if argv is None else argv)
    logger.info("trained in %.0f s; wrote %s (%.1f MB)", time.perf_counter() - start, args.directory,
                sum(os.path.getsize(os.path.join(args.directory, f)) for f in os.listdir(args.directory)) / 1e6)

    # 6. check
    scores = evaluate(args.directory, args.preview, device)
    logger.info("SSIM against the training images: min %.3f, mean %.3f", min(scores), sum(scores) / len(scores))
    return 0


if __name__ == "__main__":
    sys.exit(main())
