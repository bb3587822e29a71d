"""Where the GPU time of a denoising step goes: kernel time by category, the top kernels, and the idle fraction.

    torchrun --nproc-per-node 2 benchmarks/profile_step.py --model real-dummy --layers 32 --cfg-parallel-size 2 \
        --enable-expert-parallel --all2all-backend all2all --json profile.json

Runs one warm-up generation, then profiles a generation of --steps steps (step 0 plus cached steps) with the torch
profiler on every rank. Kernel time is summed per category (expert kernels, element-wise, attention, NCCL, GEMMs,
other); idle is the share of the profiled window in which no kernel ran on the device (launch gaps, host syncs).
Rank 0 prints its table; --json writes every rank's.
"""

from __future__ import annotations

import argparse
import importlib
import json
import time
from collections import defaultdict

import torch

from bench_pipeline import add_layout_args, load_pipeline, run_meta  # noqa: E402 (benchmarks/ is the cwd's path)

# Kernel-name fragments per category, first match wins (lower-case).
CATEGORIES = (
    ("experts", ("gate_up", "down_unpermute", "_count_pairs", "_block_offsets", "_place_pairs", "topk_sum",
                 "gather_sorted_rows")),
    ("nccl", ("nccl",)),
    ("attention", ("flash", "fmha", "attention", "sdpa", "cudnn", "attn")),
    ("gemm", ("gemm", "sm90_xmma", "cutlass", "cublas", "splitk", "nvjet")),
    ("elementwise", ("elementwise", "reduce", "copy", "cat", "index", "vectorized", "scatter", "gather", "norm",
                     "softmax", "topk", "sort", "fill", "triton", "where", "arange", "cumsum", "mul", "add")),
)


def category(name: str) -> str:
    lower = name.lower()
    for cat, fragments in CATEGORIES:
        if any(f in lower for f in fragments):
            return cat
    return "other"


def breakdown(prof, window_us: float) -> dict:
    """Kernel time per category and per kernel, and the idle share of the window (union of kernel intervals)."""
    per_cat, per_kernel, intervals = defaultdict(float), defaultdict(float), []
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        start, end = event.time_range.start, event.time_range.end
        if end <= start:
            continue
        per_cat[category(event.name)] += end - start
        per_kernel[event.name] += end - start
        intervals.append((start, end))
    busy, last_end, first = 0.0, None, None
    for start, end in sorted(intervals):
        first = start if first is None else first
        if last_end is None or start > last_end:
            busy += end - start
            last_end = end
        elif end > last_end:
            busy += end - last_end
            last_end = end
    total = sum(per_cat.values())
    span = (last_end - first) if intervals else 0.0
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:25]
    return dict(
        window_ms=window_us / 1e3, kernel_span_ms=span / 1e3, busy_ms=busy / 1e3, kernel_ms=total / 1e3,
        idle_fraction=1 - busy / window_us if window_us else 0.0,
        categories={c: dict(ms=t / 1e3, share=t / total if total else 0.0) for c, t in sorted(per_cat.items(), key=lambda kv: -kv[1])},
        top_kernels=[dict(name=n[:160], ms=t / 1e3, category=category(n)) for n, t in top],
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_layout_args(p)
    p.add_argument("--steps", type=int, default=4, help="steps of the profiled generation (step 0 + cached steps)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    pipe, state, world, load_s = load_pipeline(args)
    call = dict(height=args.height, width=args.width, guidance_scale=args.guidance_scale, seed=0, output_type="latent")
    sync = torch.cuda.synchronize if state.device.type == "cuda" else (lambda: None)
    pipe("warm-up prompt", num_inference_steps=max(args.steps, 3), **call)
    sync()
    world.barrier()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if state.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        t0 = time.perf_counter()
        pipe("a cup of coffee on the table", num_inference_steps=args.steps, **call)
        sync()
        window_us = (time.perf_counter() - t0) * 1e6
    report = breakdown(prof, window_us)
    report["cuda_graph"] = getattr(pipe, "cuda_graph_status", None)
    reports = world.all_gather_object(report)
    if state.rank == 0:
        meta = run_meta(args, pipe, load_s)
        r = reports[0]
        print(f"{meta['device']} | {meta['layout']} | {args.model} {meta['layers']} layers, {args.height}x{args.width}, "
              f"{args.steps} steps profiled | cuda graph {r['cuda_graph']}")
        print(f"window {r['window_ms']:.1f} ms, kernels {r['kernel_ms']:.1f} ms, busy {r['busy_ms']:.1f} ms, "
              f"idle {100 * r['idle_fraction']:.1f}%")
        for cat, v in r["categories"].items():
            print(f"  {cat:12s} {v['ms']:9.1f} ms  {100 * v['share']:5.1f}%")
        for k in r["top_kernels"][:12]:
            print(f"  {k['ms']:8.1f} ms  {k['category']:11s} {k['name'][:100]}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(dict(meta=meta, ranks=reports), f, indent=2)
    importlib.import_module(f"{args.package}.distributed").destroy_parallel_state()


if __name__ == "__main__":
    main()
