"""Time the VAE decode of one image (HunyuanImage-3.0's decoder, random weights) side by side in one process.

Contenders, all on the same latents and weights, timed in interleaved rounds (the order reversed every other
round; the median is reported), cudnn.benchmark on:
  reference                     today's computation: every conv an F.conv3d over all 4 frames, F.group_norm, the
                                last frame kept (tests/unit/hunyuan_reference.reference_vae_decode)
  <time_conv>/<layout>          decode_latents with decoder.set_kernels(time_conv, channels_last): one-frame convs
                                as conv2d, only the last frame of conv_out; the T > 1 convs as "conv3d" or
                                "stacked_conv2d", activations contiguous or channels_last_3d
  split/<time_conv>/<layout>    under torchrun: decode_latents(..., group=world), each rank a band of rows
Per contender: ms, speed-up over reference, max |image - reference image| (same dtype) and the PSNR of the image
against an fp32 decode (reference path, TF32 off). The fastest one-rank setting is printed as the one to put in
omni_ep/models/hunyuan_image3/vae_conv.PREFERRED_KERNELS for this device. Then, per distinct T > 1 conv of the
decode, each formulation alone (--no-per-conv skips it).

    python benchmarks/bench_vae.py --json benchmarks/results/vae_h200.json
    torchrun --nproc-per-node 2 benchmarks/bench_vae.py --json benchmarks/results/vae_h200_x2.json
    python benchmarks/bench_vae.py --device cpu --tiny            # the script itself, tiny decoder, fp32
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: tests.unit.hunyuan_reference

from omni_ep.config import ParallelConfig  # noqa: E402
from omni_ep.distributed import destroy_parallel_state, get_world_group, init_parallel_state  # noqa: E402
from omni_ep.models.hunyuan_image3.vae import HunyuanVAEConv3d, HunyuanVAEDecoder, decode_latents  # noqa: E402
from omni_ep.models.hunyuan_image3.vae_conv import TIME_CONVS, conv3d_frames  # noqa: E402
from tests.unit.hunyuan_reference import reference_vae_decode  # noqa: E402

SCALING_FACTOR = 0.562679178327931
TINY_VAE = dict(block_out_channels=(32, 32, 32, 64, 64))  # the tiny checkpoint's decoder (make_tiny_checkpoint)
LAYOUTS = {"contiguous": False, "channels_last": True}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--tiny", action="store_true", help="the tiny decoder (widths 32..64) at 256x256")
    parser.add_argument("--size", type=int, default=None, help="image side in pixels (default 1024, --tiny 256)")
    parser.add_argument("--dtype", default=None, choices=("bf16", "fp16", "fp32"),
                        help="decode dtype (default bf16 on cuda, fp32 on cpu)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (after one untimed warm-up call each)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--no-per-conv", action="store_true", help="skip the per-conv table")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    return parser.parse_args()


def make_sync(device: torch.device, group):
    """Wait for the device's queued work, then (several ranks) for every rank: each timed call starts together."""

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        group.barrier()

    return sync


def interleaved_median_ms(fns: dict, rounds: int, sync) -> dict[str, float]:
    """Median ms per call of every fn over ``rounds`` rounds, the fns taking turns in each round (the order reversed
    every other round, so none always follows the same one); one untimed call each first (cuDNN autotuning)."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for r in range(rounds):
        for name in list(fns) if r % 2 == 0 else list(fns)[::-1]:
            sync()
            start = time.perf_counter()
            fns[name]()
            sync()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def psnr(image: torch.Tensor, target: torch.Tensor) -> float:
    """dB, images in [0, 1]."""
    mse = (image.double() - target.double()).square().mean().item()
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


def reference_image(decoder: HunyuanVAEDecoder, latents: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    W = {k: v.to(dtype) for k, v in decoder.state_dict().items()}
    z = (latents / SCALING_FACTOR).to(dtype).unsqueeze(2)
    frames = reference_vae_decode(W, z, decoder.ffactor_temporal)
    return (frames[:, :, -1].float() / 2 + 0.5).clamp(0, 1)


def conv_inputs(decoder: HunyuanVAEDecoder, latents: torch.Tensor) -> list[tuple[tuple, HunyuanVAEConv3d]]:
    """(input shape, conv) of every distinct T > 1 conv of one decode (forward hooks)."""
    seen = {}

    def hook(module, args, kwargs):
        x = args[0]
        if x.shape[2] > 1 and not kwargs.get("last_frame_only", False):
            seen.setdefault((tuple(x.shape), tuple(module.weight.shape)), module)

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True)
               for m in decoder.modules() if isinstance(m, HunyuanVAEConv3d)]
    decode_latents(decoder, latents, SCALING_FACTOR)
    for h in handles:
        h.remove()
    return [(shape, module) for (shape, _), module in seen.items()]


def per_conv_table(decoder, latents, rounds: int, sync) -> list[dict]:
    rows = []
    for shape, conv in conv_inputs(decoder, latents):
        x = torch.randn(shape, device=latents.device, dtype=conv.weight.dtype)
        inputs = {layout: x.contiguous(memory_format=torch.channels_last_3d) if cl else x
                  for layout, cl in LAYOUTS.items()}
        fns = {f"{tc}/{layout}": (lambda tc=tc, x=x_l: conv3d_frames(x, conv.weight, conv.bias, tc))
               for tc in TIME_CONVS for layout, x_l in inputs.items()}
        ms = interleaved_median_ms(fns, max(2, rounds // 2), sync)
        rows.append({"input": list(shape), "weight": list(conv.weight.shape), "ms": ms, "best": min(ms, key=ms.get)})
        del x, inputs
    return rows


def main() -> None:
    started = time.perf_counter()
    args = parse_args()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    state = init_parallel_state(ParallelConfig(data_parallel_size=world_size),
                                backend="gloo" if args.device == "cpu" else None)
    group = get_world_group()
    device = state.device if args.device == "cuda" else torch.device("cpu")
    if device.type != args.device:
        raise SystemExit(f"--device {args.device}: none here")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    size = args.size or (256 if args.tiny else 1024)
    lead = group.rank == 0

    torch.manual_seed(0)  # the same weights and latents on every rank
    with torch.device(device):
        decoder = HunyuanVAEDecoder(**(TINY_VAE if args.tiny else {})).eval().to(dtype)
    latents = torch.randn(1, decoder.latent_channels, size // 16, size // 16, device=device)
    sync = make_sync(device, group)

    with torch.no_grad():
        # The truth for PSNR: the same (rounded) weights, every op in fp32, TF32 off.
        tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        image_fp32 = reference_image(decoder, latents, torch.float32)
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.benchmark = True
        images = {"reference": reference_image(decoder, latents, dtype)}
        fns = {"reference": lambda: reference_image(decoder, latents, dtype)}
        settings = {f"{tc}/{layout}": (tc, cl) for tc in TIME_CONVS for layout, cl in LAYOUTS.items()}
        if world_size > 1:
            settings |= {f"split/{name}": setting for name, setting in settings.items()}

        def decode(name):
            decoder.set_kernels(*settings[name])
            return decode_latents(decoder, latents, SCALING_FACTOR, group=group if name.startswith("split/") else None)

        for name in settings:
            images[name] = decode(name)
            fns[name] = lambda name=name: decode(name)
        ms = interleaved_median_ms(fns, args.rounds, sync)
        per_conv = [] if args.no_per_conv else per_conv_table(decoder, latents, args.rounds, sync)

    results = [{"name": name, "ms": ms[name], "speedup": ms["reference"] / ms[name],
                "max_abs_diff_vs_reference": (images[name] - images["reference"]).abs().max().item(),
                "psnr_vs_fp32_db": psnr(images[name], image_fp32)} for name in fns]
    one_rank = [r for r in results if r["name"] in settings and not r["name"].startswith("split/")]
    best = min(one_rank, key=lambda r: r["ms"])
    if lead:
        print(f"VAE decode {size}x{size}, latents {tuple(latents.shape)}, {dtype}, {device.type} "
              f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{torch.get_num_threads()} threads'}), "
              f"{world_size} rank(s), median of {args.rounds} rounds")
        print(f"{'contender':<34}{'ms':>10}{'speed-up':>10}{'max|diff| vs ref':>18}{'PSNR vs fp32':>14}")
        for r in results:
            print(f"{r['name']:<34}{r['ms']:>10.1f}{r['speedup']:>9.2f}x{r['max_abs_diff_vs_reference']:>18.2e}"
                  f"{r['psnr_vs_fp32_db']:>11.1f} dB")
        print(f"fastest on one rank: {best['name']}  ->  PREFERRED_KERNELS[{device.type!r}] = "
              f"{settings[best['name']]}")
        for row in per_conv:
            cells = "  ".join(f"{name} {t:7.2f}" for name, t in row["ms"].items())
            print(f"conv {str(tuple(row['input'])):<28} -> {row['weight'][0]:>5} ch: {cells} ms  best {row['best']}")
        print(f"total {time.perf_counter() - started:.0f} s")
    if lead and args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                "torch": torch.__version__, "cudnn": torch.backends.cudnn.version(), "world_size": world_size,
                "dtype": str(dtype), "size": size, "tiny": args.tiny, "threads": torch.get_num_threads(),
                "date": datetime.date.today().isoformat(), "command": " ".join(sys.argv)}
        best_setting = {"time_conv": settings[best["name"]][0], "channels_last": settings[best["name"]][1]}
        args.json.write_text(json.dumps({**meta, "contenders": results, "best_one_rank": best_setting,
                                         "per_conv": per_conv}, indent=1))
    destroy_parallel_state()


if __name__ == "__main__":
    main()
