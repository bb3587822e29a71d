"""The shared MLP of a HunyuanImage-3.0 MoE layer: replicated (what omni_ep runs) vs the per-rank share a
tensor-parallel split would compute (I / TP), next to the routed experts of the same layer.

    python benchmarks/bench_shared_mlp.py --json benchmarks/results/shared_mlp_h100.json

A TP split would add no collective (its partial output joins the MoE layer's one TP all-reduce), so the
difference is compute alone. bf16, CUDA events via triton.testing.do_bench (median).
"""

from __future__ import annotations

import argparse
import datetime
import json

import torch
from triton.testing import do_bench

from omni_ep.config import ParallelConfig
from omni_ep.distributed import destroy_parallel_state, init_parallel_state
from omni_ep.models.hunyuan_image3.moe import HunyuanFusedMoE, HunyuanImage3SharedMLP


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[4097, 8194])
    p.add_argument("--json", default=None)
    args = p.parse_args()
    init_parallel_state(ParallelConfig())
    H, I, E, dev, dtype = 4096, 3072, 64, torch.device("cuda"), torch.bfloat16
    experts = HunyuanFusedMoE(num_experts=E, top_k=8, hidden_size=H, intermediate_size=I, params_dtype=dtype).to(dev)
    for w in (experts.w13_weight, experts.w2_weight):
        w.data.normal_(0, 0.02)
    rows = []
    for T in args.tokens:
        x = torch.randn(T, H, device=dev, dtype=dtype)
        logits = torch.randn(T, E, device=dev)
        routed_ms = do_bench(lambda: experts(x, logits), return_mode="median")
        for tp in (1, 2, 4, 8):
            mlp = HunyuanImage3SharedMLP(H, I // tp, params_dtype=dtype).to(dev)
            for param in mlp.parameters():
                param.data.normal_(0, 0.02)
            ms = do_bench(lambda: mlp(x), return_mode="median")
            rows.append(dict(tokens=T, tp_share=tp, shared_mlp_ms=ms, routed_experts_ms=routed_ms,
                             routed_layer=f"{type(experts).__name__} ({experts.experts.name} experts)",
                             shared_over_routed=ms / routed_ms))
    destroy_parallel_state()
    print(f"{torch.cuda.get_device_name()} | shared MLP (I={I}) per-rank share vs routed experts "
          f"(64 experts top-8, {rows[0]['routed_layer']}), bf16")
    print(f"{'tokens':>7s} {'share':>6s} {'shared ms':>10s} {'routed ms':>10s} {'shared/routed':>14s}")
    for r in rows:
        print(f"{r['tokens']:7d} {'1/' + str(r['tp_share']):>6s} {r['shared_mlp_ms']:10.3f} "
              f"{r['routed_experts_ms']:10.3f} {r['shared_over_routed']:14.3f}")
    if args.json:
        meta = dict(date=datetime.date.today().isoformat(), device=torch.cuda.get_device_name(),
                    torch=torch.__version__, command="python benchmarks/bench_shared_mlp.py " + " ".join(
                        f"--tokens {' '.join(map(str, args.tokens))}".split()))
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=2)


if __name__ == "__main__":
    main()
