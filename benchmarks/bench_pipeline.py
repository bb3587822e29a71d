"""Time the HunyuanImage-3.0 pipeline end to end: seconds per image, per denoising step (first and later), peak
memory per rank, in one process or under torchrun; and compare its output with a saved run.

    # tiny checkpoint (made on the fly)
    python benchmarks/bench_pipeline.py --model tiny --height 256 --width 256
    # the full-size model with dummy weights, CFG2 + EP2 on two GPUs, 50 steps
    torchrun --nproc-per-node 2 benchmarks/bench_pipeline.py --model real-dummy --layers 32 --steps 50 \
        --cfg-parallel-size 2 --enable-expert-parallel --all2all-backend all2all --json out.json
    # sequence parallel: --ulysses-degree 2 or --ring-degree 2 in place of --cfg-parallel-size 2
    # Instruct-Distil at full size, 8 steps, DP2 + EP2 with two prompts (seconds per image = call / prompts)
    torchrun --nproc-per-node 2 benchmarks/bench_pipeline.py --model real-dummy --variant instruct-distil \
        --layers 32 --steps 8 --data-parallel-size 2 --enable-expert-parallel --num-prompts 2
    # the same run of another version of the package (benchmarks/make_baseline_package.sh), output saved, then
    # this version compared with it
    PYTHONPATH=.ab_base python benchmarks/bench_pipeline.py --package omni_ep_base ... --save-output ref.pt
    python benchmarks/bench_pipeline.py ... --compare-output ref.pt

Dummy weights are the same model in every layout (each tensor drawn from its name), so outputs of layouts can be
compared. Prints a table and writes JSON (--json). Timings synchronise the device at step ends.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import math
import os
import platform
import tempfile
import time

import numpy as np
import torch

COMPARE_PROMPTS = ["a cat sitting on a red chair", "an astronaut riding a horse"]


def add_layout_args(p: argparse.ArgumentParser) -> None:
    """The model, size and parallel-layout flags shared with profile_step.py."""
    p.add_argument("--package", default="omni_ep", help="the package to run (omni_ep, or a baseline copy)")
    p.add_argument("--model", default="tiny", help='"tiny", "real-dummy", or a checkpoint folder')
    p.add_argument("--layers", type=int, default=4, help="real-dummy: number of decoder layers")
    p.add_argument("--variant", default="base", choices=["base", "instruct", "instruct-distil"],
                   help="tiny / real-dummy: which released checkpoint's layout (Instruct-Distil: guidance_emb, "
                        "timestep_r_emb, one row per prompt)")
    p.add_argument("--num-experts", type=int, default=64, help="real-dummy: experts per layer")
    p.add_argument("--image-base-size", type=int, default=None, choices=(256, 512, 1024),
                   help="real-dummy: the config's image_base_size, whose buckets --height / --width snap to (default "
                        "1024, the released models'; 512 for cheap real-width checks)")
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--guidance-scale", type=float, default=5.0)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--ulysses-degree", type=int, default=1)
    p.add_argument("--ring-degree", type=int, default=1)
    p.add_argument("--cfg-parallel-size", type=int, default=1)
    p.add_argument("--data-parallel-size", type=int, default=1)
    p.add_argument("--enable-expert-parallel", action="store_true")
    p.add_argument("--all2all-backend", default="all2all")
    p.add_argument("--expert-placement", default=None,
                   help="linear (default), round_robin, or balanced (needs --expert-loads)")
    p.add_argument("--expert-loads", default=None, help="the expert-loads JSON that placement balanced splits by")
    p.add_argument("--cuda-graph", action="store_true", help="replay the cached steps as a CUDA graph")
    p.add_argument("--experts-backend", default=None, help="local-experts implementation (default: the platform's)")
    p.add_argument("--quantization", default=None, choices=["fp8"], help="fp8: the routed experts in FP8 (not exact)")


def make_model_dir(pkg: str, kind: str, layers: int, num_experts: int, directory: str,
                   variant: str = "base", image_base_size: int = 1024) -> tuple[str, str]:
    """(checkpoint folder, load_format) for "tiny" or "real-dummy" (real config.json, fewer layers), in the layout
    of ``variant`` (the Instruct ones need a package that knows them)."""
    tiny = importlib.import_module(f"{pkg}.models.hunyuan_image3.make_tiny_checkpoint")
    if kind == "tiny":
        config = None if variant == "base" else tiny.tiny_config(variant=variant)
        return tiny.write_tiny_checkpoint(directory, config=config), "safetensors"
    if kind != "real-dummy":
        return kind, "safetensors"
    config_cls = importlib.import_module(f"{pkg}.models.hunyuan_image3.configuration").HunyuanImage3Config
    flags = {} if variant == "base" else dict(cfg_distilled=variant == "instruct-distil",
                                              use_meanflow=variant == "instruct-distil",
                                              model_version="HunyuanImage-3.0-Instruct")
    config = config_cls(num_hidden_layers=layers, num_experts=num_experts, moe_topk=[8] * layers,
                        moe_intermediate_size=[3072] * layers, num_shared_expert=[1] * layers,
                        image_base_size=image_base_size, **flags)
    tokenization = importlib.import_module(f"{pkg}.models.hunyuan_image3.tokenization")
    tokenization.write_tiny_tokenizer(directory, **({} if variant == "base" else dict(instruct=True)))
    config.to_json_file(os.path.join(directory, "config.json"))
    return directory, "dummy"


def placement_kwargs(args) -> dict:
    """ParallelConfig's placement fields where given (a baseline package may not know them)."""
    kw = dict(expert_placement=args.expert_placement, expert_loads=args.expert_loads)
    return {k: v for k, v in kw.items() if v is not None}


def expert_load_split(loads: dict[str, list[int]], state, args) -> str:
    """The busiest rank's rows over an even split's, per placement, at EP = this run's world size."""
    placement = importlib.import_module(f"{args.package}.layers.fused_moe.expert_placement")
    ep = max(state.world_size, 2)
    ratios = {p: placement.pacing_ratio(list(loads.values()), ep, p) for p in placement.EXPERT_PLACEMENTS}
    return f"busiest rank's rows / even split at EP{ep}: " + ", ".join(f"{p} {r:.3f}" for p, r in ratios.items())


def load_pipeline(args):
    """(pipeline, parallel state, world group, load seconds) of --package with the layout of args."""
    if args.image_base_size is not None and args.model != "real-dummy":
        raise SystemExit(f"--image-base-size applies to --model real-dummy only; {args.model!r} has its config's")
    pkg = importlib.import_module(args.package)
    dist = importlib.import_module(f"{args.package}.distributed")
    config = pkg.ParallelConfig(tensor_parallel_size=args.tensor_parallel_size, ulysses_degree=args.ulysses_degree,
                                ring_degree=args.ring_degree, cfg_parallel_size=args.cfg_parallel_size,
                                data_parallel_size=args.data_parallel_size,
                                enable_expert_parallel=args.enable_expert_parallel, all2all_backend=args.all2all_backend,
                                **placement_kwargs(args))
    state = dist.init_parallel_state(config)
    world = dist.get_world_group()
    path = load_format = None
    if state.rank == 0:
        path, load_format = make_model_dir(args.package, args.model, args.layers, args.num_experts, tempfile.mkdtemp(),
                                           args.variant, args.image_base_size or 1024)
    path, load_format = world.all_gather_object((path, load_format))[0]
    pipelines = importlib.import_module(f"{args.package}.pipelines")
    t0 = time.perf_counter()
    quantization = {"quantization": args.quantization} if args.quantization else {}  # older packages lack it
    pipe = pipelines.HunyuanImage3Pipeline.from_pretrained(path, torch_dtype=getattr(torch, args.dtype),
                                                           load_format=load_format, **quantization)
    load_s = time.perf_counter() - t0
    pipe.set_progress_bar_config(disable=True)
    pipe.cuda_graphs = args.cuda_graph
    fused_moe = importlib.import_module(f"{args.package}.layers.fused_moe").FusedMoE
    for layer in (m for m in pipe.transformer.modules() if isinstance(m, fused_moe)):
        if args.experts_backend is not None:
            layer.set_experts_backend(args.experts_backend)
    return pipe, state, world, load_s


def run_meta(args, pipe, load_s) -> dict:
    cfg = pipe.transformer.config
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    return dict(date=datetime.date.today().isoformat(), device=device, torch=torch.__version__,
                package=args.package, layout=importlib.import_module(f"{args.package}.distributed").get_parallel_config().describe(),
                model=args.model, variant=args.variant, layers=cfg.num_hidden_layers, hidden=cfg.hidden_size, experts=cfg.num_experts,
                height=args.height, width=args.width, guidance=args.guidance_scale, dtype=args.dtype, load_s=load_s,
                cuda_graph=args.cuda_graph, quantization=args.quantization,
                tf32=torch.backends.cuda.matmul.allow_tf32)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_layout_args(p)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--num-prompts", type=int, default=1,
                   help="prompts of the timed call (several for DP); s/image = the call's seconds / prompts")
    p.add_argument("--json", default=None)
    p.add_argument("--save-output", default=None, help="rank 0 saves the final latents and images of two prompts")
    p.add_argument("--compare-output", nargs="+", default=None,
                   help="rank 0 compares its latents and images with each of these files")
    p.add_argument("--rtol", type=float, default=None, help="fail when the latents' relative error exceeds this")
    p.add_argument("--no-timing", action="store_true", help="only the --save/--compare generation")
    p.add_argument("--record-expert-loads", default=None,
                   help="first record the expert loads of one generation (another prompt than the timed one's) "
                        "into this JSON, for --expert-placement balanced")
    args = p.parse_args()
    pipe, state, world, load_s = load_pipeline(args)
    on_cuda = state.device.type == "cuda"
    step_timer = importlib.import_module(f"{args.package}.pipelines.step_timer")
    call = dict(height=args.height, width=args.width, guidance_scale=args.guidance_scale, seed=0)

    if args.record_expert_loads:
        expert_loads = importlib.import_module(f"{args.package}.layers.fused_moe.expert_loads")
        with expert_loads.record_expert_loads(pipe.transformer) as loads:
            pipe(COMPARE_PROMPTS[0], num_inference_steps=args.steps, output_type="latent", **call)
        if state.rank == 0:
            expert_loads.write_expert_loads(args.record_expert_loads, loads, prompt=COMPARE_PROMPTS[0],
                                            steps=args.steps, height=args.height, width=args.width)
            rows_per_rank = expert_load_split(loads, state, args)
            print(f"expert loads of {len(loads)} layers -> {args.record_expert_loads}; " + rows_per_rank)

    row = None
    if not args.no_timing:
        timer = step_timer.StepTimer(state.device)
        pipe("warm-up prompt", num_inference_steps=3, **call)  # compile kernels, capture nothing yet
        if on_cuda:
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.synchronize()
        timer.start()
        wall_start = time.time()
        prompts = [f"a cup of coffee on the table, view {i}" for i in range(args.num_prompts)]
        pipe(prompts, num_inference_steps=args.steps, callback_on_step_end=timer, **call)
        if on_cuda:
            torch.cuda.synchronize()
        total = time.perf_counter() - timer.started
        wall_clock_unix = [wall_start, time.time()]  # for gpu_clocks.py
        steps = timer.step_seconds
        later = steps[1:] or steps
        graph = getattr(pipe, "cuda_graph_status", None)
        row = dict(image_s=total / args.num_prompts, call_s=total, prompts=args.num_prompts, first_step_s=steps[0],
                   later_step_s=sum(later) / len(later),
                   decode_and_rest_s=total - (timer.ends[-1] - timer.started),
                   peak_memory_gib_per_rank=world.all_gather_object(step_timer.peak_memory_gib(state.device)),
                   wall_clock_unix=wall_clock_unix, cuda_graph_captured=None if graph is None else graph[0],
                   cuda_graph_error=None if graph is None else graph[1])

    comparison = None
    if args.save_output or args.compare_output:
        latents = pipe(COMPARE_PROMPTS, num_inference_steps=args.steps, output_type="latent", **call)
        if state.rank == 0:
            z = latents.images.float()
            with torch.no_grad():
                images = np.concatenate([pipe.decode(z[i : i + 1].to(state.device), "np") for i in range(len(z))])
            if args.save_output:
                torch.save(dict(latents=z, images=torch.from_numpy(images)), args.save_output)
            comparison = []
            for reference in args.compare_output or []:
                ref = torch.load(reference)
                err = ((z - ref["latents"]).norm() / ref["latents"].norm()).item()
                psnrs = [psnr(images[i], ref["images"][i].numpy()) for i in range(len(images))]
                comparison.append(dict(reference=reference, latents_rel_err=err, image_psnr_db=psnrs))
                print(f"vs {reference}: latents relative error {err:.2e}, image PSNR "
                      + ", ".join(f"{x:.1f}" for x in psnrs) + " dB")
            for c in comparison:
                if args.rtol is not None and not c["latents_rel_err"] <= args.rtol:
                    raise SystemExit(
                        f"latents differ from {c['reference']}: {c['latents_rel_err']:.2e} > {args.rtol:.0e}"
                    )

    if state.rank == 0:
        meta = run_meta(args, pipe, load_s) | dict(steps=args.steps)
        print(f"{meta['device']} | {meta['layout']} | {args.package} {args.model} ({args.variant}): {meta['layers']} layers, "
              f"{args.height}x{args.width}, {args.steps} steps, {args.dtype}, load {load_s:.1f} s")
        if row is not None:
            print(f"{'s/image':>8s} {'prompts':>7s} {'step 0 s':>9s} {'later s/step':>13s} {'decode+rest s':>14s}  graph  "
                  "peak GiB/rank")
            print(f"{row['image_s']:8.2f} {row['prompts']:7d} {row['first_step_s']:9.3f} {row['later_step_s']:13.4f} "
                  f"{row['decode_and_rest_s']:14.3f}  {row['cuda_graph_captured']!s:5s}  "
                  f"{[round(x, 1) for x in row['peak_memory_gib_per_rank']]}")
            if row["cuda_graph_error"]:
                print(f"cuda graph: {row['cuda_graph_error']}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(dict(meta=meta, timing=row, comparison=comparison), f, indent=2)
    importlib.import_module(f"{args.package}.distributed").destroy_parallel_state()


if __name__ == "__main__":
    main()
