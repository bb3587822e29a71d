"""Tune the Triton expert GEMMs for HunyuanImage-3.0 shapes and write the JSON files the package reads.

For each E_local and token count M, routing is drawn as in bench_moe.py (64 global experts, top-8, this rank's
E_local of them). For each candidate block_m (the row padding of the alignment, shared by both GEMMs) every
gate_up and every down tile candidate is timed alone (triton.testing.do_bench, median); the block_m with the
smallest sum of the two best times wins. The candidate lists are short on purpose (5-10 per GEMM and
block_m): a sweep that fits one 10-minute GPU session, not an exhaustive search.

  python benchmarks/tune_moe.py --experts 64 32 16 8 --tokens 64 256 1024 4096 8192 16384 \
      --out-dir omni_ep/layers/fused_moe/experts/configs

writes E{E}_N{I}_{device}.json per E (format in omni_ep/.../triton_configs.py).

--refine starts from the files already there (in --out-dir, else the package's) instead of sweeping tiles:
for each point it times the whole path (TritonExperts.apply) with one change at a time (down first, then gate_up:
stages, group size, the tma or gluon kernel) in rounds interleaved with the current config, and keeps the best
change where the median of the per-round speedups passes --min-gain twice: in the screen of all candidates and
in a two-way A/B that confirms it. Each timed slot follows 300 ms of untimed runs of the same config
(bench_moe.interleaved_ms): on a power-capped card a kernel timed right after another partly runs at the other's
clock, which flips few-percent verdicts:

  python benchmarks/tune_moe.py --refine --experts 64 32 16 8 --tokens 1024 4096 8192 16384 \
      --out-dir omni_ep/layers/fused_moe/experts/configs
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_moe import ep_routing, expert_weights, interleaved_ms, paired_ratio, run_meta  # noqa: E402

from omni_ep.layers.fused_moe.experts.triton_configs import (  # noqa: E402
    CONFIG_DIR,
    GemmConfig,
    MoEConfig,
    config_file_name,
    load_config_file,
)
from omni_ep.layers.fused_moe.experts.triton_experts import TritonExperts  # noqa: E402
from omni_ep.layers.fused_moe.experts.triton_kernels.align import align_pairs_to_blocks  # noqa: E402
from omni_ep.layers.fused_moe.experts.triton_kernels.down_unpermute import down_unpermute  # noqa: E402
from omni_ep.layers.fused_moe.experts.triton_kernels.gate_up_swiglu import gate_up_swiglu  # noqa: E402


def gemm(kernel, block_n, block_k, group_m, num_warps, num_stages, programs_per_sm=1) -> GemmConfig:
    return GemmConfig(kernel, block_n, block_k, group_m, num_warps, num_stages, programs_per_sm)


def block_m_candidates(num_tokens: int) -> list[int]:
    """About M*8/64 rows per expert: small row blocks waste less padding when experts get few rows."""
    if num_tokens <= 128:
        return [16, 32]
    if num_tokens <= 512:
        return [32, 64]
    return [64, 128]


def tile_candidates(block_m: int, gemm_name: str) -> list[GemmConfig]:
    """Tiles that fit Hopper's shared memory at this block_m, for each kernel (triton_configs.KERNELS); gate_up's
    tile holds two weight tiles (gate and up). The gluon kernels take 16 rows per warp (num_warps = block_m / 16);
    programs_per_sm 0: a plain grid instead of a persistent one."""
    if block_m <= 32:
        return [gemm("pointer", 64, 128, 1, 4, 4), gemm("pointer", 128, 128, 1, 4, 3),
                gemm("pointer", 64, 64, 1, 4, 5), gemm("pointer", 128, 64, 1, 4, 4), gemm("pointer", 32, 128, 1, 4, 4)]
    if block_m == 64:
        if gemm_name == "gate_up":
            return [gemm("pointer", 128, 64, 8, 4, 4), gemm("pointer", 128, 64, 8, 8, 4),
                    gemm("pointer", 64, 128, 8, 4, 3), gemm("pointer", 64, 64, 8, 4, 5),
                    gemm("tma", 128, 64, 8, 4, 4), gemm("tma", 128, 64, 8, 8, 4), gemm("gluon", 128, 64, 8, 4, 4)]
        return [gemm("pointer", 128, 64, 8, 4, 4), gemm("pointer", 256, 64, 8, 8, 4),
                gemm("pointer", 128, 128, 8, 4, 3), gemm("pointer", 256, 64, 8, 8, 3),
                gemm("pointer", 128, 64, 8, 4, 4, programs_per_sm=2),
                gemm("tma", 256, 64, 8, 8, 4), gemm("tma", 128, 64, 8, 4, 4), gemm("gluon", 128, 64, 8, 4, 4)]
    # block_m 128: 128 x 256 x 64 tiles (gate_up: 128 gate + 128 up columns), 3-4 stages.
    if gemm_name == "gate_up":
        return [gemm("pointer", 128, 64, 8, 8, 3), gemm("pointer", 128, 64, 8, 8, 4), gemm("tma", 128, 64, 8, 8, 3),
                gemm("tma", 128, 64, 8, 8, 4), gemm("tma", 128, 64, 8, 8, 4, programs_per_sm=0),
                gemm("gluon", 128, 64, 8, 8, 3), gemm("gluon", 128, 64, 8, 8, 4)]
    # The gluon down writes sorted rows at 3 stages (its staging tile fits beside the ring), scatters at 4.
    return [gemm("pointer", 256, 64, 8, 8, 3), gemm("pointer", 256, 64, 8, 8, 4), gemm("tma", 256, 64, 8, 8, 3),
            gemm("tma", 256, 64, 8, 8, 4), gemm("tma", 256, 64, 16, 8, 4),
            gemm("tma", 256, 64, 8, 8, 4, programs_per_sm=0), gemm("tma", 128, 64, 8, 8, 4),
            gemm("tma", 128, 128, 8, 8, 3), gemm("gluon", 256, 64, 8, 8, 3), gemm("gluon", 256, 64, 8, 8, 4)]


def time_ms(fn) -> float:
    try:
        return do_bench(fn, warmup=10, rep=60, return_mode="median")
    except Exception as exc:  # a tile that does not fit (shared memory, registers) is skipped
        print(f"    skipped: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
        return float("inf")


def tune_point(x, ids, weights, w13, w2, num_sms: int, verbose: bool, block_ms=None) -> tuple[MoEConfig, float]:
    """Best config for one routing, and its gate_up + down time in ms."""
    best, best_ms = None, float("inf")
    top_k = ids.shape[1]
    for block_m in block_ms or block_m_candidates(x.shape[0]):
        align = align_pairs_to_blocks(ids, w13.shape[0], block_m)
        chosen = {}
        total = 0.0
        for gemm_name in ("gate_up", "down"):
            timings = []
            for cfg in tile_candidates(block_m, gemm_name):
                if gemm_name == "gate_up":
                    ms = time_ms(lambda c=cfg: gate_up_swiglu(x, w13, align, top_k, c, num_sms))
                else:
                    ms = time_ms(lambda c=cfg: down_unpermute(h, w2, weights, align, c, num_sms))
                timings.append((ms, cfg))
                if verbose:
                    print(f"    block_m {block_m} {gemm_name} {cfg}: {ms:.3f} ms", flush=True)
            ms, cfg = min(timings, key=lambda t: t[0])
            chosen[gemm_name] = cfg
            total += ms
            if gemm_name == "gate_up":
                h = gate_up_swiglu(x, w13, align, top_k, cfg, num_sms)
        if total < best_ms:
            best, best_ms = MoEConfig(block_m, **chosen), total
    return best, best_ms


REFINEMENTS = {  # GemmConfig fields, changed one set at a time on top of the current config, down first
    "down": [{"num_stages": 3}, {"num_stages": 4}, {"group_m": 4}, {"group_m": 16}, {"kernel": "tma"},
             {"kernel": "gluon", "num_stages": 3}],
    "gate_up": [{"num_stages": 3}, {"num_stages": 4}, {"group_m": 4}, {"group_m": 16}, {"kernel": "tma"},
                {"kernel": "gluon", "num_stages": 3}, {"kernel": "gluon", "num_stages": 4}],
}


def _gains(fns: dict, rounds: int) -> dict:
    """Speedup of each fn over fns["current"]: median of per-round time ratios (interleaved, 300 ms settle)."""
    times = interleaved_ms(fns, budget_ms=300.0 * rounds, rounds=rounds, max_calls=100, settle_ms=300.0)
    return {name: paired_ratio(times, name, "current") for name in fns}


def refine_point(x, ids, weights, w13, w2, config: MoEConfig, rounds: int, min_gain: float,
                 verbose: bool) -> MoEConfig:
    """config with the changes that made the whole path faster by more than min_gain: per GEMM, every candidate
    is screened against the current config in one interleaved A/B, and the best one is kept only if a second,
    two-way A/B against the current config confirms the gain (the best of several noisy screens is biased
    upward: the winner's curse)."""
    for gemm, options in REFINEMENTS.items():
        candidates = {"current": config}
        for extra in options:
            try:
                candidate = dataclasses.replace(config, **{gemm: dataclasses.replace(getattr(config, gemm), **extra)})
            except ValueError as exc:  # a change this block_m or tile cannot take (e.g. gluon at 4 warps per 128 rows)
                if verbose:
                    print(f"    {gemm} {extra}: not a valid config: {exc}", flush=True)
                continue
            if candidate != config:  # a change the config has already is not a candidate
                candidates[json.dumps(extra)] = candidate
        fns = {}
        for name, cfg in candidates.items():
            try:
                TritonExperts(cfg).apply(x, ids, weights, w13, w2)
                fns[name] = lambda c=cfg: TritonExperts(c).apply(x, ids, weights, w13, w2)
            except Exception as exc:  # a variant that does not fit (shared memory) is skipped
                print(f"    {gemm} {name}: skipped: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
        gains = _gains(fns, rounds)
        best = max(gains, key=gains.get)
        if verbose:
            for name, gain in gains.items():
                print(f"    {gemm} {name}: x{gain:.3f}", flush=True)
        if best == "current" or gains[best] <= 1 + min_gain:
            continue
        confirmed = _gains({"current": fns["current"], best: fns[best]}, rounds)[best]
        if verbose:
            print(f"    {gemm} {best}: confirmed x{confirmed:.3f}", flush=True)
        if confirmed > 1 + min_gain:
            config = candidates[best]
    return config


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts", type=int, nargs="+", default=[64, 32, 16, 8], help="E_local = 64 / EP")
    p.add_argument("--tokens", type=int, nargs="+", default=[64, 256, 1024, 4096, 8192, 16384])
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=3072)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--out-dir", type=Path, required=True)
    p.add_argument("--verbose", action="store_true", help="print every candidate's time")
    p.add_argument("--block-m", type=int, nargs="+", default=None, help="only these block_m (default: by M)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--refine", action="store_true", help="refine the existing files' entries (see above)")
    p.add_argument("--rounds", type=int, default=6, help="--refine: interleaved rounds per comparison")
    p.add_argument("--min-gain", type=float, default=0.015, help="--refine: speedup a change must pass, twice")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("tune_moe.py tunes CUDA kernels: run it on a machine with a CUDA GPU.")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    device_name = torch.cuda.get_device_name()
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    generator = torch.Generator("cuda").manual_seed(args.seed)
    H, I = args.hidden, args.intermediate
    print(json.dumps(run_meta()), flush=True)  # the run's date and versions go to its log, not to the files
    for num_local in args.experts:
        w13, w2 = expert_weights(num_local, H, I, torch.bfloat16, "cuda", generator)
        path = args.out_dir / config_file_name(num_local, I, device_name)
        table = {}
        if args.refine:
            start = path if path.exists() else CONFIG_DIR / path.name
            if not start.exists():
                sys.exit(f"--refine: no {path.name} in {args.out_dir} or {CONFIG_DIR}: run the tile sweep first.")
            table = dict(load_config_file(start))
        for m in args.tokens:
            x = torch.randn(m, H, device="cuda", dtype=torch.bfloat16, generator=generator)
            ids, weights = ep_routing(m, num_local, args.top_k, "cuda", generator)
            flops = 2 * 3 * H * I * int((ids >= 0).sum())
            if args.refine:
                if m not in table:
                    sys.exit(f"--refine: {start.name} has no entry for M={m}.")
                cfg = refine_point(x, ids, weights, w13, w2, table[m], args.rounds, args.min_gain, args.verbose)
                print(f"E={num_local} M={m}: {cfg}", flush=True)
            else:
                cfg, ms = tune_point(x, ids, weights, w13, w2, num_sms, args.verbose, args.block_m)
                print(f"E={num_local} M={m}: {ms:.3f} ms ({flops / ms / 1e9:.0f} TFLOP/s GEMMs only) {cfg}", flush=True)
            table[m] = cfg
        meta = {"device": device_name, "written_by": "benchmarks/tune_moe.py" + (" --refine" if args.refine else "")}
        path.write_text(json.dumps({"_meta": meta, **{str(m): c.to_dict() for m, c in sorted(table.items())}},
                                   indent=1) + "\n")
        print(f"wrote {path}", flush=True)
        del w13, w2
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
