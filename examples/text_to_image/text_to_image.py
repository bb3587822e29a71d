"""Text-to-image with HunyuanImage-3.0 on one process or many (torchrun), with expert parallel.

    python examples/text_to_image/text_to_image.py --prompt "a cup of coffee on the table"
    torchrun --nproc-per-node 2 examples/text_to_image/text_to_image.py --tensor-parallel-size 2 --enable-expert-parallel

Without --model it runs the demo checkpoint in checkpoints/hunyuan-image3-demo (the architecture at toy size,
trained on a few pictures; its README lists the prompts it knows). The checkpoint's variant (base, Instruct,
Instruct-Distil) comes from its config.json and generation_config.json, and so do the defaults of steps and
guidance. Stages: 1. every check that needs no weight
(layout, sizes, steps, guidance, prompt lengths, output path), on every rank before any collective; 2. the process
groups; 3. loading, each rank reading only its share (logged per rank; --print-layout stops before it and shows
what each rank would read); 4. generation (time per step, peak memory per rank); 5. the PNGs (rank 0).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import PIL.Image
import torch

from omni_ep.config import ALL2ALL_BACKENDS, EXPERT_PLACEMENTS, ParallelConfig
from omni_ep.layers.fused_moe.fp8 import QUANTIZATIONS

DEMO_CHECKPOINT = str(Path(__file__).resolve().parents[2] / "checkpoints" / "hunyuan-image3-demo")
DTYPES = {"auto": None, "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
logger = logging.getLogger("omni_ep.text_to_image")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=DEMO_CHECKPOINT, help="HunyuanImage-3.0 checkpoint folder (released layout)")
    p.add_argument("--prompt", default=["a cup of coffee on the table"], nargs="+",
                   help="one prompt, or several (split over data-parallel ranks)")
    p.add_argument("--negative-prompt", default=None,
                   help="text of the unconditional rows (padded with <cfg> tokens; at most as many tokens as a prompt)")
    p.add_argument("--num-images-per-prompt", type=int, default=1, help="images per prompt, one batch")
    p.add_argument("--output", default="text_to_image.png",
                   help="PNG path (its folder is made); with several images _0, _1, ... are added")
    p.add_argument("--height", type=int, default=None, help="pixels; default the model's image_base_size")
    p.add_argument("--width", type=int, default=None, help="pixels; default the model's image_base_size")
    p.add_argument("--list-sizes", action="store_true", help="print the sizes (height x width) the model makes, exit")
    p.add_argument("--num-inference-steps", type=int, default=None,
                   help="denoising steps; default the checkpoint's generation_config (50; 8 for Instruct-Distil)")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="classifier-free guidance (<= 1 turns it off), or Instruct-Distil's distilled guidance; "
                        "default the checkpoint's generation_config")
    p.add_argument("--system-prompt", default=None,
                   help="Instruct: the system prompt's text or a preset name (default: the checkpoint's choice; "
                        "'' for none)")
    p.add_argument("--recaption", default=None,
                   help="Instruct: a rewritten prompt, placed in <recaption> as the model's own text stage would "
                        "(that stage is not part of omni_ep)")
    p.add_argument("--seed", type=int, default=1234, help="image k starts from torch.Generator().manual_seed(seed + k)")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="TP: attention heads (and experts without EP)")
    p.add_argument("--ulysses-degree", type=int, default=1,
                   help="SP, Ulysses: each rank a share of the tokens, heads exchanged by all-to-all")
    p.add_argument("--ring-degree", type=int, default=1, help="SP, ring: each rank a share of the tokens, K/V passed on")
    p.add_argument("--cfg-parallel-size", type=int, default=1, choices=[1, 2],
                   help="2: the cond and uncond rows on different ranks")
    p.add_argument("--data-parallel-size", type=int, default=1, help="DP: prompts split over replicas")
    p.add_argument("--pipeline-parallel-size", type=int, default=1, help="PP: layer stages (not supported yet)")
    p.add_argument("--enable-expert-parallel", action="store_true",
                   help="split the experts over every rank (EP = TP x SP x CFG x DP) instead of slicing them by TP")
    p.add_argument("--all2all-backend", default="all2all", choices=ALL2ALL_BACKENDS,
                   help="how tokens reach their experts' ranks (all2all: sparse, the faster on 2 x H200)")
    p.add_argument("--expert-placement", default="linear", choices=EXPERT_PLACEMENTS,
                   help="which experts each EP rank holds: contiguous blocks, round robin, or balanced per layer "
                        "by recorded expert loads (--expert-loads)")
    p.add_argument("--expert-loads", default=None,
                   help="the expert-loads JSON that --expert-placement balanced splits by (--record-expert-loads)")
    p.add_argument("--record-expert-loads", default=None,
                   help="write the rows routed to each expert of each layer in this run to this JSON (rank 0)")
    p.add_argument("--dtype", default="auto", choices=list(DTYPES),
                   help="weights; auto: float32 on a CPU, bfloat16 on a GPU (the VAE decoder stays float32 on a CPU)")
    p.add_argument("--quantization", default=None, choices=list(QUANTIZATIONS),
                   help="fp8: the routed experts in FP8 (e4m3, a scale per weight row and per token), quantized as "
                        "they load: faster experts and half their memory, not exact (default: none, exact)")
    p.add_argument("--load-format", default="safetensors", choices=["safetensors", "dummy"],
                   help="dummy: random weights of the checkpoint's shapes, no weight file read")
    p.add_argument("--print-layout", action="store_true",
                   help="show the process groups, each rank's experts and the bytes it would read; load nothing")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more detail (and progress lines of every rank)")
    p.add_argument("-q", "--quiet", action="count", default=0, help="warnings and errors only")
    return p.parse_args(argv)


def output_paths(output: str, num_images: int) -> list[str]:
    """The PNG path of each image; makes the folder and checks that PIL can write the format, before any load."""
    root, ext = os.path.splitext(output)
    if ext.lower() not in PIL.Image.registered_extensions():
        raise ValueError(f"--output {output!r}: unknown image extension {ext!r}; use .png")
    if os.path.isdir(output):
        raise ValueError(f"--output {output!r} is a folder; give a file name such as {os.path.join(output, 'out.png')}")
    folder = os.path.dirname(os.path.abspath(output))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"--output {output!r}: cannot make the folder {folder!r} ({exc.strerror})") from None
    if not os.access(folder, os.W_OK):
        raise ValueError(f"--output {output!r}: the folder {folder!r} is not writable")
    return [output] if num_images == 1 else [f"{root}_{i}{ext}" for i in range(num_images)]


def check_before_loading(args):
    """Stage 1, on every rank before any collective: (layout, model config, variant, request, output paths)."""
    from transformers import PreTrainedTokenizerFast

    from omni_ep.layers.fused_moe.expert_loads import read_expert_loads
    from omni_ep.models.hunyuan_image3 import HunyuanImage3Config
    from omni_ep.models.hunyuan_image3.loading import check_supported_layout
    from omni_ep.pipelines.hunyuan_image3.inputs import check_inputs, warn_if_resized
    from omni_ep.pipelines.hunyuan_image3.variant import HunyuanImage3Variant

    layout = ParallelConfig(
        tensor_parallel_size=args.tensor_parallel_size, ulysses_degree=args.ulysses_degree,
        ring_degree=args.ring_degree, cfg_parallel_size=args.cfg_parallel_size,
        data_parallel_size=args.data_parallel_size, pipeline_parallel_size=args.pipeline_parallel_size,
        enable_expert_parallel=args.enable_expert_parallel, all2all_backend=args.all2all_backend,
        expert_placement=args.expert_placement, expert_loads=args.expert_loads)
    check_supported_layout(layout)
    if not os.path.isdir(args.model):
        raise FileNotFoundError(f"--model {args.model!r}: no such checkpoint folder")
    config = HunyuanImage3Config.from_pretrained(args.model)
    if args.expert_loads is not None:  # each layer's entry is checked when the layer is built
        loads = read_expert_loads(args.expert_loads)
        if any(len(counts) != config.num_experts for counts in loads.values()):
            raise ValueError(f"--expert-loads {args.expert_loads!r} was recorded for another number of experts than "
                             f"this model's {config.num_experts}")
    variant = HunyuanImage3Variant.from_pretrained(args.model)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(args.model)
    request = check_inputs(config, tokenizer, layout, variant, args.prompt, height=args.height, width=args.width,
                           num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                           negative_prompt=args.negative_prompt, num_images_per_prompt=args.num_images_per_prompt,
                           seed=args.seed, system_prompt=args.system_prompt, recaption=args.recaption)
    layout.check_world_size(int(os.environ.get("WORLD_SIZE", 1)))  # init_parallel_state checks it too, later
    warn_if_resized(request)
    paths = [] if args.print_layout else output_paths(args.output, request.num_images)
    if args.record_expert_loads is not None:
        folder = os.path.dirname(os.path.abspath(args.record_expert_loads))
        if args.print_layout:
            raise ValueError("--record-expert-loads needs a generation; --print-layout runs none")
        if os.path.isdir(args.record_expert_loads):
            raise ValueError(f"--record-expert-loads {args.record_expert_loads!r} is a folder; give a file name")
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            raise ValueError(f"--record-expert-loads {args.record_expert_loads!r}: the folder {folder!r} is not a "
                             "writable folder")
    return layout, config, variant, request, paths


def print_layout(layout: ParallelConfig, config, model: str) -> None:
    """Stage 3 without loading: the groups, and each rank's experts and planned reads (rank 0 prints)."""
    from omni_ep.distributed import all_rank_groups, get_ep_group, get_parallel_state, get_world_group
    from omni_ep.layers.fused_moe.expert_placement import experts_per_rank
    from omni_ep.models.hunyuan_image3.loading import plan_load

    state = get_parallel_state()
    stats = plan_load(model, dtype=torch.bfloat16)
    rows = get_world_group().all_gather_object((state.rank, get_ep_group().rank, stats.bytes_read,
                                                stats.expert_bytes_read))
    if state.rank != 0:
        return
    logger.info("layout: %s, world size %d", layout.describe(), state.world_size)
    for name, groups in all_rank_groups(layout).items():
        if max(len(g) for g in groups) > 1:
            logger.info("  %s groups: %s", name, groups)
    for rank, ep_rank, total, experts in rows:
        if not layout.enable_expert_parallel:
            held = f"all {config.num_experts} experts, 1/{layout.tensor_parallel_size} of each"
        elif layout.expert_placement == "balanced":  # each layer its own experts
            held = (f"{config.num_experts // layout.expert_parallel_size} experts a layer, balanced per layer by "
                    f"{layout.expert_loads}")
        else:
            placement = experts_per_rank(config.num_experts, layout.expert_parallel_size, layout.expert_placement)
            held = f"experts {placement[ep_rank]}"
        logger.info("  rank %d: ep_rank %d, %s; would read %s (%s of experts)", rank, ep_rank, held,
                    megabytes(total), megabytes(experts))


def megabytes(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n < 1e9 else f"{n / 1e9:.2f} GB"


def main(argv=None) -> int:
    args = parse_args(argv)
    from omni_ep.logger import configure_logging

    configure_logging(args.verbose - args.quiet)
    from omni_ep.distributed import destroy_parallel_state, get_world_group, init_parallel_state
    from omni_ep.pipelines.step_timer import StepTimer, peak_memory_gib

    try:
        # 1. checks that need no weight, on every rank, before any collective
        if args.list_sizes:
            from omni_ep.models.hunyuan_image3 import HunyuanImage3Config
            from omni_ep.pipelines.hunyuan_image3.variant import HunyuanImage3Variant

            if not os.path.isdir(args.model):
                raise FileNotFoundError(f"--model {args.model!r}: no such checkpoint folder")
            variant = HunyuanImage3Variant.from_pretrained(args.model)  # its template's buckets (37 for Instruct)
            base = HunyuanImage3Config.from_pretrained(args.model).image_base_size
            print("\n".join(f"{h}x{w}" for h, w in variant.template.buckets(base)))
            return 0
        layout, config, variant, request, paths = check_before_loading(args)

        # 2. process groups
        state = init_parallel_state(layout)
        if args.print_layout:
            print_layout(layout, config, args.model)
            return 0

        # 3. load: each rank its share
        from omni_ep.layers.fused_moe.expert_loads import record_expert_loads, write_expert_loads
        from omni_ep.pipelines import HunyuanImage3Pipeline  # diffusers: seconds to import, so after the checks

        start = time.perf_counter()
        pipe = HunyuanImage3Pipeline.from_pretrained(args.model, torch_dtype=DTYPES[args.dtype],
                                                     load_format=args.load_format, quantization=args.quantization)
        load_seconds = time.perf_counter() - start
        pipe.set_progress_bar_config(disable=state.rank != 0 or args.quiet > 0)
        experts = next(m for m in pipe.transformer.modules() if hasattr(m, "local_expert_ids"))
        read = pipe.transformer.load_stats
        vae_read = getattr(pipe.vae, "load_stats", None)
        rows = get_world_group().all_gather_object(
            (state.rank, experts.ep_rank, experts.local_expert_ids, read.bytes_read + (vae_read.bytes_read if vae_read
             else 0), read.expert_bytes_read, load_seconds))
        logger.info("layout: %s, world size %d, device %s, %s%s", layout.describe(), state.world_size,
                    state.device.type, pipe.dtype, f", experts in {args.quantization}" if args.quantization else "")
        logger.info("model: %s (%s template), defaults %d steps, guidance %s", variant.name, variant.template.name,
                    variant.num_inference_steps, variant.guidance_scale)
        logger.info("experts: %d per layer, %d local per rank", config.num_experts, experts.local_num_experts)
        which = " of layer 0" if layout.expert_placement == "balanced" else ""  # balanced: each layer its own
        for rank, ep_rank, ids, total, expert_bytes, seconds in rows:
            logger.info("  rank %d: ep_rank %d, experts%s %s; read %s (%s of experts) in %.1f s", rank, ep_rank, which,
                        ids, megabytes(total), megabytes(expert_bytes), seconds)

        # 4. generate
        timer = StepTimer(state.device)
        start = time.perf_counter()
        with record_expert_loads(pipe.transformer) if args.record_expert_loads else nullcontext() as loads:
            out = pipe(request.prompts, height=request.height, width=request.width,
                       num_inference_steps=request.num_inference_steps, guidance_scale=request.guidance_scale,
                       negative_prompt=args.negative_prompt, num_images_per_prompt=request.num_images_per_prompt,
                       seed=args.seed, callback_on_step_end=timer, system_prompt=args.system_prompt,
                       recaption=args.recaption)
        total = time.perf_counter() - start
        if loads is not None and state.rank == 0:
            write_expert_loads(args.record_expert_loads, loads, prompts=request.prompts, height=request.height,
                               width=request.width, steps=request.num_inference_steps)
            logger.info("wrote the expert loads of %d layers to %s", len(loads), args.record_expert_loads)
        peaks = get_world_group().all_gather_object((state.rank, peak_memory_gib(state.device)))
        first, later = timer.first_step_seconds, timer.later_step_seconds
        later_mean = f"{sum(later) / len(later):.3f} s" if later else "-"
        logger.info("time: %.2f s for %d image(s) in %d generation(s) of %d steps each: step 0 %.3f s, later steps "
                    "%s (mean of %d per generation)", total, request.num_images, len(first),
                    request.num_inference_steps, sum(first) / len(first), later_mean, request.num_inference_steps - 1)
        memory = "GPU allocated" if state.device.type == "cuda" else "CPU RSS"
        for rank, peak in peaks:
            logger.info("  rank %d: peak memory %.2f GiB (%s)", rank, peak, memory)

        # 5. save (rank 0)
        if out is not None:
            for path, image in zip(paths, out.images):
                image.save(path)
                logger.info("wrote %s (%dx%d)", path, image.width, image.height)
    except (ValueError, FileNotFoundError, NotImplementedError) as exc:
        logger.error("%s", exc)
        return 2
    finally:
        destroy_parallel_state()
    return 0


if __name__ == "__main__":
    sys.exit(main())
