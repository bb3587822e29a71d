"""Text-to-image with HunyuanImage-3.0 on one process or many (torchrun), with expert parallel.

    python examples/text_to_image/text_to_image.py --prompt "a cup of coffee on the table"
    torchrun --nproc-per-node 2 examples/text_to_image/text_to_image.py --tensor-parallel-size 2 --enable-expert-parallel

With no --model it uses a tiny random-weight checkpoint in the released layout, written on first use into
$OMNI_EP_CACHE (default ~/.cache/omni_ep). Prints the layout, seconds per step and peak memory per rank,
and writes a PNG (rank 0). The checkpoint's variant (base, Instruct, Instruct-Distil) comes from its config.json
and generation_config.json, and so do the defaults of steps and guidance.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

from omni_ep.config import ALL2ALL_BACKENDS, EXPERT_PLACEMENTS, ParallelConfig

DTYPES = {"auto": None, "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="HunyuanImage-3.0 checkpoint folder (default: a tiny one)")
    p.add_argument("--prompt", default="a cup of coffee on the table", nargs="+",
                   help="one prompt, or several (split over data-parallel ranks)")
    p.add_argument("--output", default="text_to_image.png", help="PNG path; with several prompts _0, _1, ... are added")
    p.add_argument("--height", type=int, default=None, help="default: the model's image_base_size")
    p.add_argument("--width", type=int, default=None, help="default: the model's image_base_size")
    p.add_argument("--num-inference-steps", type=int, default=None,
                   help="default: the checkpoint's generation_config.json (50; 8 for Instruct-Distil)")
    p.add_argument("--guidance-scale", type=float, default=None, help="default: the checkpoint's generation_config.json")
    p.add_argument("--system-prompt", default=None,
                   help="Instruct: the system prompt's text or a preset name (default: the checkpoint's choice; "
                        "'' for none)")
    p.add_argument("--recaption", default=None,
                   help="Instruct: a rewritten prompt, placed in <recaption> as the model's own text stage would "
                        "(that stage is not part of omni_ep)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--ulysses-degree", type=int, default=1)
    p.add_argument("--ring-degree", type=int, default=1)
    p.add_argument("--cfg-parallel-size", type=int, default=1)
    p.add_argument("--data-parallel-size", type=int, default=1)
    p.add_argument("--enable-expert-parallel", action="store_true")
    p.add_argument("--all2all-backend", default="allgather_reducescatter", choices=ALL2ALL_BACKENDS)
    p.add_argument("--expert-placement", default="linear", choices=EXPERT_PLACEMENTS)
    p.add_argument("--dtype", default="auto", choices=list(DTYPES), help="auto: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--load-format", default="safetensors", choices=["safetensors", "dummy"])
    return p.parse_args(argv)


def tiny_checkpoint_path() -> str:
    """The default tiny checkpoint, written once (atomically) by the first process that needs it."""
    from omni_ep.models.hunyuan_image3.make_tiny_checkpoint import write_tiny_checkpoint

    cache = os.environ.get("OMNI_EP_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "omni_ep"))
    path = os.path.join(cache, "tiny-hunyuan-image3")
    if not os.path.isfile(os.path.join(path, "model.safetensors.index.json")):
        os.makedirs(cache, exist_ok=True)
        staging = tempfile.mkdtemp(dir=cache)
        write_tiny_checkpoint(staging)
        try:
            os.rename(staging, path)
        except OSError:  # another process finished first
            pass
    return path


def main(argv=None) -> int:
    args = parse_args(argv)
    from omni_ep.distributed import destroy_parallel_state, get_world_group, init_parallel_state
    from omni_ep.pipelines import HunyuanImage3Pipeline
    from omni_ep.pipelines.hunyuan_image3.variant import HunyuanImage3Variant
    from omni_ep.pipelines.step_timer import StepTimer, peak_memory_gib

    try:
        config = ParallelConfig(
            tensor_parallel_size=args.tensor_parallel_size, ulysses_degree=args.ulysses_degree,
            ring_degree=args.ring_degree, cfg_parallel_size=args.cfg_parallel_size,
            data_parallel_size=args.data_parallel_size, enable_expert_parallel=args.enable_expert_parallel,
            all2all_backend=args.all2all_backend, expert_placement=args.expert_placement)
        if args.model is not None and not os.path.isdir(args.model):
            raise FileNotFoundError(f"--model {args.model!r}: no such checkpoint folder")
        if args.model is not None:  # a layout the checkpoint cannot use fails before any process group
            HunyuanImage3Variant.from_pretrained(args.model).check_parallel_config(config)
        state = init_parallel_state(config)
        model = args.model
        if model is None:
            if state.rank == 0:
                model = tiny_checkpoint_path()
            model = get_world_group().all_gather_object(model)[0]
        dtype = DTYPES[args.dtype] or (torch.bfloat16 if state.device.type == "cuda" else torch.float32)
        pipe = HunyuanImage3Pipeline.from_pretrained(model, torch_dtype=dtype, load_format=args.load_format)
        pipe.set_progress_bar_config(disable=state.rank != 0)
        cfg = pipe.transformer.config
        height, width = args.height or cfg.image_base_size, args.width or cfg.image_base_size

        experts = next(m for m in pipe.transformer.modules() if hasattr(m, "local_expert_ids"))
        layout = get_world_group().all_gather_object((state.rank, experts.ep_rank, experts.local_expert_ids))
        if state.rank == 0:
            print(f"layout: {config.describe()}, world size {state.world_size}, device {state.device.type}, {dtype}")
            print(f"model: {pipe.variant.name} ({pipe.variant.template.name} template), "
                  f"defaults {pipe.variant.num_inference_steps} steps, guidance {pipe.variant.guidance_scale}")
            print(f"experts: {cfg.num_experts} per layer, {experts.local_num_experts} local per rank")
            for rank, ep_rank, ids in layout:
                print(f"  rank {rank}: ep_rank {ep_rank}, experts {ids}")

        timer = StepTimer(state.device)
        start = time.perf_counter()
        out = pipe(args.prompt, height=height, width=width, num_inference_steps=args.num_inference_steps,
                   guidance_scale=args.guidance_scale, seed=args.seed, callback_on_step_end=timer,
                   system_prompt=args.system_prompt, recaption=args.recaption)
        total = time.perf_counter() - start
        steps = timer.step_seconds
        later = steps[1:] or steps
        stats = get_world_group().all_gather_object((state.rank, peak_memory_gib(state.device)))
        if state.rank == 0:
            print(f"time: {total:.2f} s total; step 0 {steps[0]:.3f} s, later steps {sum(later) / len(later):.3f} s "
                  f"mean over {len(later)} step(s) (per generation round)")
            for rank, peak in stats:
                print(f"  rank {rank}: peak memory {peak:.2f} GiB ({'GPU allocated' if state.device.type == 'cuda' else 'CPU RSS'})")
            root, ext = os.path.splitext(args.output)
            for i, image in enumerate(out.images):
                path = args.output if len(out.images) == 1 else f"{root}_{i}{ext or '.png'}"
                image.save(path)
                print(f"wrote {path} ({image.width}x{image.height})")
    except (ValueError, FileNotFoundError, NotImplementedError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        destroy_parallel_state()
    return 0


if __name__ == "__main__":
    sys.exit(main())
