"""The model's collectives alone, at a cached step's sizes, under torchrun: how fast the communication library
moves the rows, so that its settings (environment variables, one run each) can be compared.

Per collective over all ranks, x [rows, hidden] per rank (default 4097 x 4096 bf16: one CFG branch's cached step
at 1024x1024, or one TP rank's row chunk of both):
  exchange        all_to_all_single, every row to each other rank and none to itself: the all2all dispatch and
                  combine at EP 2 (8 of 64 experts touch the other rank's 32 for 99.7% of tokens)
  all_gather      [rows, H] -> [R x rows, H]: TP x EP before qkv_proj; the allgather_reducescatter dispatch
  reduce_scatter  [R x rows, H] -> [rows, H]: TP x EP after o_proj; the allgather_reducescatter combine
  all_reduce      [R x rows, H]: TP without EP after o_proj and the experts
Each is timed over --iters calls after --warmup (CUDA events, median per call, the slowest rank's; CPU: wall
clock) and checked once against what it must produce (small integers: exact in bf16). Bus bandwidth as
nccl-tests defines it: bytes of the whole result / time, times (R - 1) / R (2 (R - 1) / R for all_reduce); for
the exchange, the bytes a rank receives / time. On a GPU rank 0 also times plain copies of x to the next GPU:
what the links give without the library.

    torchrun --nproc-per-node 2 benchmarks/bench_collectives.py --json out.json
    NCCL_PROTO=Simple torchrun --nproc-per-node 2 benchmarks/bench_collectives.py   # one setting per run
    torchrun --nproc-per-node 2 benchmarks/bench_collectives.py --device cpu --rows 64 --hidden 32  # gloo, plumbing
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

from omni_ep.distributed.group_coordinator import GroupCoordinator


def parse_args(argv=None) -> argparse.Namespace:
    intro, rest = __doc__.split("\n\n", 1)
    p = argparse.ArgumentParser(description=intro, epilog=rest, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=4097, help="rows each rank contributes")
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--json", default=None, help="rank 0 writes the results here")
    return p.parse_args(argv)


def timed(fn, device: torch.device, warmup: int, iters: int) -> float:
    """Median ms of one call; all ranks start each call together (a barrier before it, outside the time)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        dist.barrier()
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def collectives(group: GroupCoordinator, x: torch.Tensor) -> dict:
    """name -> (call, check, bytes of the whole result, bus factor)."""
    R, rank, rows = group.world_size, group.rank, x.shape[0]
    to_others = [0 if r == rank else rows for r in range(R)]
    size = x.numel() * x.element_size()

    def x_of(r):  # rank r's x (main: rank r adds r)
        return x - rank + r

    def stacked_of(r):  # rank r's [R x rows, H] input of the reductions: block j is x_r * (j + 1)
        return torch.cat([x_of(r) * (j + 1) for j in range(R)])

    stacked = stacked_of(rank)
    summed = stacked.clone()  # all_reduce works in place: checked once, then timed on growing sums

    def exact(expected):
        return lambda out: torch.testing.assert_close(out, expected, rtol=0, atol=0)

    everyone = sum(stacked_of(r) for r in range(R))
    return {
        "exchange": (lambda: group.all_to_all_single(x, to_others, to_others),
                     exact(torch.cat([x_of(r) for r in range(R) if r != rank])), (R - 1) * size, 1.0),
        "all_gather": (lambda: group.all_gather(x), exact(torch.cat([x_of(r) for r in range(R)])), R * size,
                       (R - 1) / R),
        "reduce_scatter": (lambda: group.reduce_scatter(stacked), exact(everyone[rank * rows : (rank + 1) * rows]),
                           R * size, (R - 1) / R),
        "all_reduce": (lambda: group.all_reduce(summed), exact(everyone), R * size, 2 * (R - 1) / R),
    }


def peer_copy_gb_per_s(x: torch.Tensor, iters: int) -> float | None:
    """GB/s of plain device-to-device copies of x to the next GPU (the copy engines over NVLink or PCIe, no
    library in between): what the links give. None without peer access."""
    other = (x.device.index + 1) % torch.cuda.device_count()
    if other == x.device.index or not torch.cuda.can_device_access_peer(x.device.index, other):
        return None
    y = torch.empty_like(x, device=torch.device("cuda", other))
    y.copy_(x)
    torch.cuda.synchronize(x.device), torch.cuda.synchronize(y.device)
    t0 = time.perf_counter()
    for _ in range(iters):
        y.copy_(x, non_blocking=True)
    torch.cuda.synchronize(x.device), torch.cuda.synchronize(y.device)
    return x.numel() * x.element_size() * iters / (time.perf_counter() - t0) / 1e9


def main(argv=None) -> int:
    a = parse_args(argv)
    device = torch.device(a.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print("no CUDA device: run on a GPU, or with --device cpu", file=sys.stderr)
            return 2
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        device = torch.device("cuda", torch.cuda.current_device())
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    group = GroupCoordinator("world", rank, tuple(range(world)), dist.group.WORLD)
    dtype = getattr(torch, a.dtype)
    # Small integers: exact in bf16 through every sum here, so each result is checked bit for bit.
    x = (torch.arange(a.rows * a.hidden, device=device) % 7).to(dtype).reshape(a.rows, a.hidden) + rank
    rows = []
    for name, (call, check, nbytes, bus_factor) in collectives(group, x).items():
        check(call())
        ms = timed(call, device, a.warmup, a.iters)
        ms_max = torch.tensor([ms], dtype=torch.float64, device=device)
        dist.all_reduce(ms_max, op=dist.ReduceOp.MAX)  # the slowest rank's median
        ms = ms_max.item()
        rows.append(dict(collective=name, ms=ms, mib=nbytes / 2**20, bus_gb_per_s=nbytes / ms / 1e6 * bus_factor))
    settings = {k: v for k, v in sorted(os.environ.items()) if k.startswith(("NCCL_", "TORCH_NCCL"))}
    peer_gb_per_s = peer_copy_gb_per_s(x, a.iters) if device.type == "cuda" and rank == 0 else None
    dist.barrier()
    if rank == 0:
        backend = (f"NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}, {torch.cuda.get_device_name(device)}"
                   if device.type == "cuda" else "gloo, cpu")
        print(f"{world} ranks, {backend}, x [{a.rows}, {a.hidden}] {a.dtype} per rank; settings: "
              + (" ".join(f"{k}={v}" for k, v in settings.items()) or "none"))
        print(f"{'collective':16s} {'ms':>9s} {'MiB':>8s} {'bus GB/s':>9s}")
        for row in rows:
            print(f"{row['collective']:16s} {row['ms']:9.4f} {row['mib']:8.1f} {row['bus_gb_per_s']:9.1f}")
        if device.type == "cuda":
            print("peer copy to the next GPU: " + ("no peer access" if peer_gb_per_s is None
                                                   else f"{peer_gb_per_s:.1f} GB/s (x, copy engines)"))
        if a.json:
            meta = dict(date=datetime.date.today().isoformat(), backend=backend, torch=torch.__version__,
                        world_size=world, args=vars(a), settings=settings, peer_copy_gb_per_s=peer_gb_per_s)
            with open(a.json, "w") as f:
                json.dump(dict(meta=meta, collectives=rows), f, indent=2)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
