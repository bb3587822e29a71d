"""Where the GPU time of a denoising step goes: kernel time by category, the top kernels, and the idle fraction.

    torchrun --nproc-per-node 2 benchmarks/profile_step.py --model real-dummy --layers 32 --cfg-parallel-size 2 \
        --enable-expert-parallel --all2all-backend all2all --json profile.json

Runs one warm-up generation, then profiles a generation of --steps steps (step 0 plus cached steps) with the torch
profiler on every rank. Kernel time is summed per category (expert kernels, element-wise, attention, NCCL, GEMMs,
convolutions, other); idle is the share of the profiled window in which no kernel ran on the device (launch gaps,
host syncs). The sequence-parallel exchanges (profiler ranges "ulysses_all_to_all", "ring_pass") get their own
line: the NCCL kernel time inside the range's spans on the GPU, and its exposed part (when no other kernel runs);
so does all the window's NCCL time ("all NCCL": the EP dispatch and combine, TP collectives).
A replayed CUDA graph (--cuda-graph) has no ranges. Rank 0 prints its table; --json writes every rank's.
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
                 "gather_sorted_rows", "quantize_rows", "groupproblemshape")),  # the last two: FP8 experts
    ("nccl", ("nccl",)),
    ("conv", ("implicit_gemm", "nchwtonhwc", "nhwctonchw", "conv")),  # cuDNN convolutions (patch embed / final layer)
    ("attention", ("flash", "fmha", "attention", "sdpa", "cudnn", "attn")),
    ("gemm", ("gemm", "sm90_xmma", "cutlass", "cublas", "splitk", "nvjet")),
    ("elementwise", ("elementwise", "reduce", "copy", "cat", "index", "vectorized", "scatter", "gather", "norm",
                     "softmax", "topk", "sort", "fill", "triton", "where", "arange", "cumsum", "scan", "mul", "add",
                     "swiglu", "moments", "memcpy", "memset")),
)


def category(name: str) -> str:
    lower = name.lower()
    for cat, fragments in CATEGORIES:
        if any(f in lower for f in fragments):
            return cat
    return "other"


# Profiler ranges around omni_ep's sequence-parallel collectives (layers/attention/ulysses.py, ring.py).
EXCHANGE_RANGES = ("ulysses_all_to_all", "ring_pass")

Interval = tuple[float, float]


def _union(intervals: list[Interval]) -> list[Interval]:
    merged = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _length(intervals: list[Interval]) -> float:
    return sum(end - start for start, end in _union(intervals))


def _exposed(intervals: list[Interval], others: list[Interval]) -> float:
    """Length of the union of intervals minus the union of others."""
    total, covered = 0.0, _union(others)
    for start, end in _union(intervals):
        total += end - start - sum(max(0.0, min(end, b) - max(start, a)) for a, b in covered)
    return total


def exchange_times(annotations: list[tuple[float, float, str]], kernels: list[tuple[float, float, str]]) -> dict:
    """Per range of EXCHANGE_RANGES (ms): the NCCL kernel time inside the range's spans on the GPU timeline, and
    the part of it during which no other kernel runs (exposed); "all NCCL": the same over the whole window.
    annotations: (start, end, range name) of the profiler's GPU-side user annotations; kernels: (start, end,
    kernel name)."""
    compute = [(s, e) for s, e, name in kernels if category(name) != "nccl"]
    nccl = [(s, e) for s, e, name in kernels if category(name) == "nccl"]
    out = {}
    if nccl:  # every NCCL kernel of the window (the EP dispatch and combine, TP collectives, exchanges)
        out["all NCCL"] = dict(kernel_ms=_length(_union(nccl)) / 1e3, exposed_ms=_exposed(nccl, compute) / 1e3,
                               ranges=0)
    for label in EXCHANGE_RANGES:
        spans = _union([(s, e) for s, e, name in annotations if name == label])
        inside = [(max(s, a), min(e, b)) for s, e in nccl for a, b in spans if min(e, b) > max(s, a)]
        if inside:
            out[label] = dict(kernel_ms=_length(inside) / 1e3, exposed_ms=_exposed(inside, compute) / 1e3,
                              ranges=len(spans))
    return out


def breakdown(prof, window_us: float) -> dict:
    """Kernel time per category and per kernel, and the idle share of the window (union of kernel intervals).
    The profiler's GPU-side user annotations (record_function ranges such as "nccl:all_to_all") span kernels
    that are counted already: they only place the exchanges."""
    per_cat, per_kernel, kernels, annotations = defaultdict(float), defaultdict(float), [], []
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        start, end = event.time_range.start, event.time_range.end
        if end <= start:
            continue
        if getattr(event, "is_user_annotation", False):
            annotations.append((start, end, event.name))
            continue
        per_cat[category(event.name)] += end - start
        per_kernel[event.name] += end - start
        kernels.append((start, end, event.name))
    intervals = _union([(s, e) for s, e, _ in kernels])
    busy = sum(e - s for s, e in intervals)
    total = sum(per_cat.values())
    span = intervals[-1][1] - intervals[0][0] if intervals else 0.0
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:25]
    return dict(
        window_ms=window_us / 1e3, kernel_span_ms=span / 1e3, busy_ms=busy / 1e3, kernel_ms=total / 1e3,
        idle_fraction=1 - busy / window_us if window_us else 0.0,
        categories={c: dict(ms=t / 1e3, share=t / total if total else 0.0) for c, t in sorted(per_cat.items(), key=lambda kv: -kv[1])},
        top_kernels=[dict(name=n[:160], ms=t / 1e3, category=category(n)) for n, t in top],
        exchanges=exchange_times(annotations, kernels),
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_layout_args(p)
    p.add_argument("--steps", type=int, default=4, help="steps of the profiled generation")
    p.add_argument("--from-step", type=int, default=0,
                   help="profile steps from this one to the last (0: the whole generation; 2: cached steps only)")
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
    prof = torch.profiler.profile(activities=activities)
    window = {}

    def profile_steps(pipeline, step, timestep, tensors):
        """Profile steps [--from-step, last]: from the end of step from_step - 1 to the end of the last."""
        if step in (args.from_step - 1, args.steps - 1):
            sync()
            if step == args.from_step - 1:
                prof.start()
                window["t0"] = time.perf_counter()
            else:
                window["s"] = time.perf_counter() - window.get("t0", window.setdefault("t0", time.perf_counter()))
                prof.stop()
        return tensors

    if args.from_step == 0:
        prof.start()
        window["t0"] = time.perf_counter()
    pipe("a cup of coffee on the table", num_inference_steps=args.steps, callback_on_step_end=profile_steps, **call)
    window_us = window["s"] * 1e6
    report = breakdown(prof, window_us)
    report["cuda_graph"] = getattr(pipe, "cuda_graph_status", None)
    reports = world.all_gather_object(report)
    if state.rank == 0:
        meta = run_meta(args, pipe, load_s) | dict(steps=args.steps, from_step=args.from_step)
        r = reports[0]
        print(f"{meta['device']} | {meta['layout']} | {args.model} {meta['layers']} layers, {args.height}x{args.width}, "
              f"steps {args.from_step}..{args.steps - 1} of {args.steps} profiled | cuda graph {r['cuda_graph']}")
        print(f"window {r['window_ms']:.1f} ms, kernels {r['kernel_ms']:.1f} ms, busy {r['busy_ms']:.1f} ms, "
              f"idle {100 * r['idle_fraction']:.1f}%")
        for cat, v in r["categories"].items():
            print(f"  {cat:12s} {v['ms']:9.1f} ms  {100 * v['share']:5.1f}%")
        for label, v in r["exchanges"].items():
            print(f"  {label:20s} NCCL {v['kernel_ms']:8.1f} ms, exposed {v['exposed_ms']:8.1f} ms")
        for k in r["top_kernels"][:12]:
            print(f"  {k['ms']:8.1f} ms  {k['category']:11s} {k['name'][:100]}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(dict(meta=meta, ranks=reports), f, indent=2)
    importlib.import_module(f"{args.package}.distributed").destroy_parallel_state()


if __name__ == "__main__":
    main()
