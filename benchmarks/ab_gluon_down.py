"""A/B of the down GEMM: the tuned Triton kernel against the Gluon kernel with the same tiles (the GLUON flag),
at every (E_local, T) of the tuned files of this GPU; steady-state interleaved rounds (bench_moe.interleaved_ms),
the GEMM alone on the gate_up output of the same inputs, and the whole path at the --whole shapes.
Prints a table; --json writes every round's times.

--k-scaling instead splits each GEMM's time (E_local 64, T 8194) into its main loop and a per-tile fixed cost
(prologue, epilogue): each kernel, and cuBLAS on the padded rows, is timed at its K and at 2K (operands repeated
along K: I for down, H for gate_up); main loop of K = t(2K) - t(K), fixed = 2 t(K) - t(2K).

  python benchmarks/ab_gluon_down.py --json benchmarks/results/ab_gluon_down_h100.json
"""

from __future__ import annotations

import argparse
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
from omni_ep.layers.fused_moe.experts.triton_kernels.align import align_pairs_to_blocks  # noqa: E402
from omni_ep.layers.fused_moe.experts.triton_kernels.down_unpermute import down_unpermute  # noqa: E402
from omni_ep.layers.fused_moe.experts.triton_kernels.gemm_tiles import gluon_module  # noqa: E402
from omni_ep.layers.fused_moe.experts.triton_kernels.gate_up_swiglu import gate_up_swiglu  # noqa: E402


def k_scaling(args, E: int = 64, T: int = 8194, H: int = 4096, I: int = 3072, K: int = 8):
    name = torch.cuda.get_device_name()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    g = torch.Generator("cuda").manual_seed(5)
    w13, w2 = expert_weights(E, H, I, torch.bfloat16, "cuda", g)
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16, generator=g)
    ids, wts = ep_routing(T, E, K, "cuda", g)
    cfg = moe_config(E, I, T, name)
    gluon_down = {**cfg["down"], "GLUON": True}
    align = align_pairs_to_blocks(ids, E, cfg["BLOCK_M"])
    h = torch.randn(align.sorted_pair_R.numel(), I, device="cuda", dtype=torch.bfloat16, generator=g)
    h2, w2_2 = torch.cat([h, h], dim=1), torch.cat([w2, w2], dim=2)
    rows = int(align.num_padded_rows.item())
    a, b, a2, b2 = h[:rows], w2[0].t().contiguous(), h2[:rows], w2_2[0].t().contiguous()
    fns = {"triton": lambda: down_unpermute(h, w2, wts, align, cfg["down"], sms),
           "triton 2K": lambda: down_unpermute(h2, w2_2, wts, align, cfg["down"], sms),
           "gluon": lambda: down_unpermute(h, w2, wts, align, gluon_down, sms),
           "gluon 2K": lambda: down_unpermute(h2, w2_2, wts, align, gluon_down, sms),
           "cublas": lambda: torch.mm(a, b), "cublas 2K": lambda: torch.mm(a2, b2)}
    x2, w13_2 = torch.cat([x, x], dim=1), torch.cat([w13, w13], dim=2)
    c, c2 = x.new_empty(rows, H).normal_(generator=g), x.new_empty(rows, 2 * H).normal_(generator=g)
    d, d2 = w13[0].t().contiguous(), w13_2[0].t().contiguous()
    fns.update({"gate_up triton": lambda: gate_up_swiglu(x, w13, align, K, cfg["gate_up"], sms),
                "gate_up triton 2K": lambda: gate_up_swiglu(x2, w13_2, align, K, cfg["gate_up"], sms),
                "gate_up cublas": lambda: torch.mm(c, d), "gate_up cublas 2K": lambda: torch.mm(c2, d2)})
    times = interleaved_ms(fns, budget_ms=150.0 * args.rounds, rounds=args.rounds, max_calls=100, settle_ms=200.0)
    t = {k: statistics.median(v) for k, v in times.items()}
    print(f"{name}, torch {torch.__version__}, triton {triton.__version__}, {date.today()}; E_local {E}, T {T}, "
          f"padded rows {rows}\n| kernel (down unless said) | t(K) ms | t(2K) ms | main loop of K, ms | fixed, ms | "
          "fixed share |\n"
          "| --- | --- | --- | --- | --- | --- |")
    for k in ("triton", "gluon", "cublas", "gate_up triton", "gate_up cublas"):
        main_loop, fixed = t[f"{k} 2K"] - t[k], 2 * t[k] - t[f"{k} 2K"]
        print(f"| {k} | {t[k]:.3f} | {t[f'{k} 2K']:.3f} | {main_loop:.3f} | {fixed:.3f} | {fixed / t[k]:.1%} |")
    if args.json:
        write_ab_json(args.json, rows=rows, times_ms=times)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts", type=int, nargs="+", default=[64, 32, 16, 8])
    p.add_argument("--tokens", type=int, nargs="+", default=[1024, 4097, 8194, 16388])
    p.add_argument("--whole", type=str, nargs="*", default=["64:8194", "32:8194"], help="E:T whole-path A/Bs")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--json", type=Path)
    p.add_argument("--k-scaling", action="store_true", help="main loop / fixed cost split (see above)")
    args = p.parse_args()
    if args.k_scaling:
        return k_scaling(args)
    H, I, K = 4096, 3072, 8
    name = torch.cuda.get_device_name()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    g = torch.Generator("cuda").manual_seed(5)
    rows, lines = [], [f"{name}, torch {torch.__version__}, triton {triton.__version__}, {date.today()}",
                        "| E_local | T | what | Triton ms | Gluon ms | Gluon speedup (median of rounds) |",
                        "| --- | --- | --- | --- | --- | --- |"]
    print("\n".join(lines), flush=True)
    whole = {tuple(int(v) for v in s.split(":")) for s in args.whole}
    for E in args.experts:
        w13, w2 = expert_weights(E, H, I, torch.bfloat16, "cuda", g)
        for T in args.tokens:
            x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16, generator=g)
            ids, wts = ep_routing(T, E, K, "cuda", g)
            cfg = moe_config(E, I, T, name)
            gluon_cfg = {**cfg, "down": {**cfg["down"], "GLUON": True}}
            align = align_pairs_to_blocks(ids, E, cfg["BLOCK_M"])
            h = gate_up_swiglu(x, w13, align, K, cfg["gate_up"], sms)
            gluon = gluon_module("down_unpermute_gluon")
            if not (cfg["down"].get("TMA") and gluon.gluon_fits(h, cfg["BLOCK_M"], gluon_cfg["down"])):
                print(f"| {E} | {T} | down | - | - | the tuned tile does not fit the Gluon kernel |", flush=True)
                continue
            ref, ref_rows = down_unpermute(h, w2, wts, align, cfg["down"], sms)
            out, out_rows = down_unpermute(h, w2, wts, align, gluon_cfg["down"], sms)
            local = ids.reshape(-1) >= 0
            ref = ref[local] if ref_rows is None else ref[ref_rows[local].long()]
            out = out[local] if out_rows is None else out[out_rows[local].long()]
            assert torch.equal(ref, out), "Gluon and Triton down kernels disagree"
            fns = {"triton": lambda: down_unpermute(h, w2, wts, align, cfg["down"], sms),
                   "gluon": lambda: down_unpermute(h, w2, wts, align, gluon_cfg["down"], sms)}
            cases = [("down", fns)]
            if (E, T) in whole:
                cases.append(("whole path", {
                    "triton": lambda: TritonExperts(cfg).apply(x, ids, wts, w13, w2),
                    "gluon": lambda: TritonExperts(gluon_cfg).apply(x, ids, wts, w13, w2)}))
            for what, pair_fns in cases:
                times = interleaved_ms(pair_fns, budget_ms=150.0 * args.rounds, rounds=args.rounds,
                                       max_calls=100, settle_ms=200.0)
                t_ms = {k: statistics.median(v) for k, v in times.items()}
                gain = paired_ratio(times, "gluon", "triton")
                line = f"| {E} | {T} | {what} | {t_ms['triton']:.3f} | {t_ms['gluon']:.3f} | x{gain:.3f} |"
                print(line, flush=True)
                lines.append(line)
                rows.append({"E_local": E, "T": T, "what": what, "times_ms": times, "speedup": gain,
                             "config_down": cfg["down"]})
        del w13, w2
        torch.cuda.empty_cache()
    if args.json:
        write_ab_json(args.json, rows=rows)


if __name__ == "__main__":
    main()
