"""Time one whole FusedMoE layer (route -> dispatch -> local experts -> combine) for given token counts,
dispatch backends and local-experts backends, on CPU (gloo) or CUDA (NCCL), one process or many.

    torchrun --nproc-per-node 2 benchmarks/bench_moe_layer.py --tokens 512 2048 --hidden 256 --intermediate 128
    torchrun --nproc-per-node 2 benchmarks/bench_moe_layer.py --tokens 4097 8194        # real widths, on GPUs

Each rank holds --tokens tokens (as with DP/CFG ranks); EP = world size. Median of --iters timed calls after
warm-up, with a device synchronize (and an EP barrier) around each. Prints a table on rank 0, writes JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time

import torch

from omni_ep.config import ParallelConfig
from omni_ep.distributed import destroy_parallel_state, get_ep_group, init_parallel_state
from omni_ep.layers.fused_moe import FusedMoE


def time_layer(layer, x, logits, iters, device) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):
        layer(x, logits)
    times = []
    for _ in range(iters):
        sync()
        get_ep_group().barrier()
        start = time.perf_counter()
        layer(x, logits)
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[1024, 4097, 8194])
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=3072)
    p.add_argument("--dispatch", nargs="+", default=["allgather_reducescatter", "all2all"])
    p.add_argument("--experts-backends", nargs="+", default=None, help="default: triton torch on CUDA, torch on CPU")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--json", default=None)
    args = p.parse_args()

    # This script owns the default group, so each backend's parallel state can be torn down and rebuilt on it.
    launched = torch.distributed.is_torchelastic_launched()
    if launched:
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    world = torch.distributed.get_world_size() if launched else 1
    rows = []
    for dispatch in args.dispatch:
        state = init_parallel_state(ParallelConfig(data_parallel_size=world, enable_expert_parallel=True,
                                                   all2all_backend=dispatch))
        device, cuda = state.device, state.device.type == "cuda"
        dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if cuda else torch.float32)
        layer = FusedMoE(args.experts, args.top_k, args.hidden, args.intermediate, params_dtype=dtype).to(device)
        g = torch.Generator(device=device).manual_seed(state.rank)
        for w in (layer.w13_weight, layer.w2_weight):
            w.data.normal_(0, 0.02, generator=g)
        for backend in args.experts_backends or (["triton", "torch"] if cuda else ["torch"]):
            layer.set_experts_backend(backend)
            for T in args.tokens:
                x = torch.randn(T, args.hidden, device=device, dtype=dtype, generator=g)
                logits = torch.randn(T, args.experts, device=device, generator=g)
                seconds = time_layer(layer, x, logits, args.iters, device)
                flops = 2 * 3 * args.hidden * args.intermediate * T * args.top_k  # this rank's tokens, all k
                rows.append(dict(dispatch=dispatch, experts_backend=backend, tokens_per_rank=T,
                                 ep=state.config.expert_parallel_size, median_ms=seconds * 1e3,
                                 tflops_per_rank=flops / seconds / 1e12))
        destroy_parallel_state()
    if state.rank == 0:
        device_name = torch.cuda.get_device_name() if cuda else (platform.processor() or "cpu")
        print(f"{device_name} | EP {rows[0]['ep']} | {args.experts} experts top-{args.top_k}, H {args.hidden}, "
              f"I {args.intermediate}, {dtype}")
        print(f"{'dispatch':24s} {'experts':8s} {'tokens/rank':>11s} {'median ms':>10s} {'TFLOP/s/rank':>13s}")
        for r in rows:
            print(f"{r['dispatch']:24s} {r['experts_backend']:8s} {r['tokens_per_rank']:11d} "
                  f"{r['median_ms']:10.3f} {r['tflops_per_rank']:13.4f}")
        if args.json:
            meta = dict(date=datetime.date.today().isoformat(), device=device_name, torch=torch.__version__,
                        experts=args.experts, top_k=args.top_k, hidden=args.hidden, intermediate=args.intermediate,
                        dtype=str(dtype), command="benchmarks/bench_moe_layer.py " + " ".join(
                            f"{k}={v}" for k, v in vars(args).items()))
            with open(args.json, "w") as f:
                json.dump(dict(meta=meta, rows=rows), f, indent=2)
    if launched:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
