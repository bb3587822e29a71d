"""Time the HunyuanImage-3.0 pipeline end to end: seconds per denoising step (first and later), VAE decode,
peak memory per rank, for each local-experts backend, in one process (or under torchrun).

    # tiny checkpoint (made on the fly)
    python benchmarks/bench_pipeline.py --model tiny --height 256 --width 256
    # real widths, random weights, 4 layers, 1024x1024 with CFG
    python benchmarks/bench_pipeline.py --model real-dummy --layers 4 --height 1024 --width 1024

Prints a table and writes JSON (--json). Timings use torch.cuda.synchronize at step ends.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import tempfile
import time

import torch

from omni_ep.config import ParallelConfig
from omni_ep.distributed import destroy_parallel_state, get_world_group, init_parallel_state
from omni_ep.layers.fused_moe import FusedMoE
from omni_ep.pipelines.step_timer import StepTimer, peak_memory_gib


def make_model_dir(kind: str, layers: int, num_experts: int, directory: str) -> tuple[str, str]:
    """(checkpoint folder, load_format) for "tiny" or "real-dummy" (real config.json, fewer layers)."""
    from omni_ep.models.hunyuan_image3.configuration import HunyuanImage3Config
    from omni_ep.models.hunyuan_image3.make_tiny_checkpoint import write_tiny_checkpoint
    from omni_ep.models.hunyuan_image3.tokenization import write_tiny_tokenizer

    if kind == "tiny":
        return write_tiny_checkpoint(directory), "safetensors"
    if kind != "real-dummy":
        return kind, "safetensors"
    config = HunyuanImage3Config(num_hidden_layers=layers, num_experts=num_experts, moe_topk=[8] * layers,
                                 moe_intermediate_size=[3072] * layers, num_shared_expert=[1] * layers)
    write_tiny_tokenizer(directory)  # special tokens by name; ids fit the real vocabulary
    config.to_json_file(os.path.join(directory, "config.json"))
    return directory, "dummy"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny", help='"tiny", "real-dummy", or a checkpoint folder')
    p.add_argument("--layers", type=int, default=4, help="real-dummy: number of decoder layers")
    p.add_argument("--num-experts", type=int, default=64, help="real-dummy: experts per layer")
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--guidance-scale", type=float, default=5.0)
    p.add_argument("--experts-backends", default="triton,torch")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--cfg-parallel-size", type=int, default=1)
    p.add_argument("--data-parallel-size", type=int, default=1)
    p.add_argument("--enable-expert-parallel", action="store_true")
    p.add_argument("--all2all-backend", default="allgather_reducescatter")
    p.add_argument("--json", default=None)
    p.add_argument("--save-latents", default=None, help="rank 0 writes the final latents of two prompts here")
    p.add_argument("--compare-latents", default=None, help="rank 0 compares its final latents with this file")
    p.add_argument("--rtol", type=float, default=1e-4, help="largest relative error --compare-latents accepts")
    args = p.parse_args()

    from omni_ep.pipelines import HunyuanImage3Pipeline

    config = ParallelConfig(tensor_parallel_size=args.tensor_parallel_size, cfg_parallel_size=args.cfg_parallel_size,
                            data_parallel_size=args.data_parallel_size,
                            enable_expert_parallel=args.enable_expert_parallel, all2all_backend=args.all2all_backend)
    state = init_parallel_state(config)
    dtype = getattr(torch, args.dtype)
    workdir = tempfile.mkdtemp()
    if state.rank == 0:
        path, load_format = make_model_dir(args.model, args.layers, args.num_experts, workdir)
    path, load_format = get_world_group().all_gather_object(
        (path, load_format) if state.rank == 0 else None)[0]
    t0 = time.perf_counter()
    pipe = HunyuanImage3Pipeline.from_pretrained(path, torch_dtype=dtype, load_format=load_format)
    load_s = time.perf_counter() - t0
    pipe.set_progress_bar_config(disable=True)
    moe_layers = [m for m in pipe.transformer.modules() if isinstance(m, FusedMoE)]

    rows = []
    for backend in args.experts_backends.split(","):
        for layer in moe_layers:
            layer.set_experts_backend(backend)
        timer = StepTimer(state.device)
        call = dict(height=args.height, width=args.width, num_inference_steps=args.steps,
                    guidance_scale=args.guidance_scale, seed=0, callback_on_step_end=timer)
        pipe("warm-up prompt", **{**call, "num_inference_steps": 2})  # compile kernels, tune caches
        if state.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.synchronize()
        timer.start()
        pipe("a cup of coffee on the table", **call)
        total = time.perf_counter() - timer.started
        steps = timer.step_seconds
        later = steps[1:]
        peaks = get_world_group().all_gather_object(peak_memory_gib(state.device))
        rows.append(dict(experts_backend=moe_layers[0].experts.name, first_step_s=steps[0],
                         later_step_s=sum(later) / max(len(later), 1), decode_and_rest_s=total - (timer.ends[-1] - timer.started),
                         total_s=total, peak_memory_gib_per_rank=peaks))

    if args.save_latents or args.compare_latents:
        latents = pipe(["a cat sitting on a red chair", "an astronaut riding a horse"], height=args.height,
                       width=args.width, num_inference_steps=args.steps, guidance_scale=args.guidance_scale, seed=0,
                       output_type="latent")
        if state.rank == 0 and args.save_latents:
            torch.save(latents.images, args.save_latents)
        if state.rank == 0 and args.compare_latents:
            ref = torch.load(args.compare_latents)
            err = ((latents.images - ref).norm() / ref.norm()).item()
            print(f"final latents vs {args.compare_latents}: relative error {err:.2e} (limit {args.rtol:.0e})")
            if not err <= args.rtol:
                raise SystemExit(f"latents differ from the reference: {err:.2e} > {args.rtol:.0e}")

    if state.rank == 0:
        cfg = pipe.transformer.config
        meta = dict(date=datetime.date.today().isoformat(), device=torch.cuda.get_device_name() if state.device.type == "cuda"
                    else platform.processor() or "cpu", torch=torch.__version__, layout=config.describe(),
                    model=args.model, layers=cfg.num_hidden_layers, hidden=cfg.hidden_size, experts=cfg.num_experts,
                    top_k=cfg.moe_topk_at(0), height=args.height, width=args.width, steps=args.steps,
                    guidance=args.guidance_scale, dtype=args.dtype, load_s=load_s)
        print(f"{meta['device']} | {meta['layout']} | {args.model}: {cfg.num_hidden_layers} layers, "
              f"{cfg.num_experts} experts top-{cfg.moe_topk_at(0)}, {args.height}x{args.width}, {args.steps} steps, "
              f"{args.dtype}, load {load_s:.1f} s")
        print(f"{'experts':8s} {'step 0 s':>9s} {'later s/step':>13s} {'decode+rest s':>14s} {'total s':>8s}  peak GiB/rank")
        for r in rows:
            print(f"{r['experts_backend']:8s} {r['first_step_s']:9.3f} {r['later_step_s']:13.4f} "
                  f"{r['decode_and_rest_s']:14.3f} {r['total_s']:8.2f}  {[round(x, 2) for x in r['peak_memory_gib_per_rank']]}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(dict(meta=meta, rows=rows), f, indent=2)
    destroy_parallel_state()


if __name__ == "__main__":
    main()
