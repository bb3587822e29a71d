"""A/B of tile-config variants on the whole Triton path (`TritonExperts.apply`: align, gate_up, down, top-k
sum): each variant is this GPU's tuned config with some flags overridden; all run on the same inputs,
interleaved at steady state (bench_moe.interleaved_ms), and each one's output must equal the tuned config's
bit for bit (the variants change where and how tiles are computed and stored, not the arithmetic).

A variant is NAME=GEMM.FLAG=VALUE[,GEMM.FLAG=VALUE...], GEMM one of gate_up / down (VALUE parsed as JSON:
1, true, 4, ...). Prints a table of median ms and the speedup over the tuned config (median of the per-round
ratios); --json writes every round's times.

  python benchmarks/ab_configs.py --points 64:8194 32:8194 \\
      --variant sorted_y=down.SORTED_Y=true --variant gluon_sorted_y=down.GLUON=true,down.SORTED_Y=true \\
      --json benchmarks/results/ab_sorted_y_h100.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from datetime import date
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_moe import ep_routing, expert_weights, interleaved_ms, paired_ratio, write_ab_json  # noqa: E402

from omni_ep.layers.fused_moe.experts.triton_configs import moe_config  # noqa: E402
from omni_ep.layers.fused_moe.experts.triton_experts import TritonExperts  # noqa: E402

TUNED = "tuned"


def parse_variant(text: str) -> tuple[str, dict]:
    """'name=down.SORTED_Y=true,gate_up.num_stages=4' -> ('name', {'down': {...}, 'gate_up': {...}})."""
    name, _, spec = text.partition("=")
    overrides: dict[str, dict] = {}
    for item in spec.split(","):
        key, _, value = item.partition("=")
        gemm, _, flag = key.partition(".")
        if gemm not in ("gate_up", "down") or not flag or not value:
            raise SystemExit(f"bad variant {text!r}: want NAME=GEMM.FLAG=VALUE[,...], GEMM gate_up or down")
        overrides.setdefault(gemm, {})[flag] = json.loads(value)
    if not name or name == TUNED:
        raise SystemExit(f"bad variant name in {text!r}")
    return name, overrides


def with_overrides(config: dict, overrides: dict) -> dict:
    return {**config, **{gemm: {**config[gemm], **flags} for gemm, flags in overrides.items()}}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--points", nargs="+", default=["64:8194", "32:8194"], help="E_local:T")
    p.add_argument("--variant", action="append", default=[], help="NAME=GEMM.FLAG=VALUE[,...]")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    variants = dict(parse_variant(v) for v in args.variant)
    H, I, K = 4096, 3072, 8
    name = torch.cuda.get_device_name()
    g = torch.Generator("cuda").manual_seed(6)
    header = f"{name}, torch {torch.__version__}, triton {triton.__version__}, {date.today()}"
    print(f"{header}\n| E_local | T | variant | ms | TFLOP/s | speedup over tuned | equal |\n"
          "| --- | --- | --- | --- | --- | --- | --- |", flush=True)
    rows = []
    for point in args.points:
        E, T = (int(v) for v in point.split(":"))
        w13, w2 = expert_weights(E, H, I, torch.bfloat16, "cuda", g)
        x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16, generator=g)
        ids, wts = ep_routing(T, E, K, "cuda", g)
        flops = 6 * H * I * int((ids >= 0).sum())
        tuned = moe_config(E, I, T, name)
        configs = {TUNED: tuned, **{n: with_overrides(tuned, o) for n, o in variants.items()}}
        ref = TritonExperts(tuned).apply(x, ids, wts, w13, w2)
        fns, equal = {}, {}
        for n, cfg in configs.items():
            try:
                equal[n] = torch.equal(TritonExperts(cfg).apply(x, ids, wts, w13, w2), ref)
            except Exception as exc:  # a variant that does not compile is reported, not timed
                print(f"| {E} | {T} | {n} | failed: {type(exc).__name__}: {str(exc)[:200]} | | | |", flush=True)
                continue
            fns[n] = lambda cfg=cfg: TritonExperts(cfg).apply(x, ids, wts, w13, w2)
        times = interleaved_ms(fns, budget_ms=150.0 * args.rounds, rounds=args.rounds, max_calls=100,
                               settle_ms=200.0)
        for n in fns:
            t = statistics.median(times[n])
            speedup = paired_ratio(times, n, TUNED)
            print(f"| {E} | {T} | {n} | {t:.3f} | {flops / t / 1e9:.0f} | x{speedup:.3f} | {equal[n]} |", flush=True)
            rows.append({"E_local": E, "T": T, "variant": n, "config": configs[n], "times_ms": times[n],
                         "speedup": speedup, "bitwise_equal": equal[n]})
        del w13, w2, x, ref
        torch.cuda.empty_cache()
    if args.json:
        write_ab_json(args.json, rows=rows)
    if not all(r["bitwise_equal"] for r in rows):
        raise SystemExit("some variant's output differs from the tuned config's")


if __name__ == "__main__":
    main()
