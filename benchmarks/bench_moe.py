"""Timing of one MoE layer's routed experts (HunyuanImage-3.0 shapes) on one GPU, in three modes.

--mode compare (the default): contenders side by side, all on the same inputs and weights, timed with CUDA events
in interleaved rounds: in each round every contender runs untimed for --settle-ms (the card's power control
lags), then back to back for a share of the budget, timed. Reported: the median over rounds, and the ratio to the
ceiling as the median of the per-round ratios (see interleaved_ms: the lent cards run at their power cap,
where this is what holds still):
  triton        omni_ep TritonExperts (tuned configs from the package, or --config-dir)
  triton_fp8    the same with FP8 weights (quantization "fp8": a scale per weight row, activations per row; on
                Hopper torch's FP8 grouped GEMM), and its gate_up GEMM alone with fast accumulation
  torch         omni_ep TorchExperts (sort + torch._grouped_mm)
  hf_<impl>     transformers' hunyuan_v1_moe experts block, once per experts implementation it offers
  dense_loop    a per-expert loop over a dense [T, E, capacity] dispatch, like the official eager path
  cublas        the ceiling: one cuBLAS bf16 matmul [P, H] x [H, 3I] with the same FLOPs
  cublas_fp8    the FP8 ceiling: torch._scaled_mm of the same shapes in e4m3, row-wise scales (with triton_fp8)

Expert parallel is modelled as one rank: E_local = 64 / EP. Router logits are drawn over all 64 experts,
softmax then top-8 (renormalised), and the slots whose expert is not among this rank's first E_local experts
become -1. FLOPs count the LOCAL (token, expert) pairs only: 2 * 3 * H * I per pair.

  python benchmarks/bench_moe.py --tokens 1024 4097 8194 16388 --experts 64 32 16 8 \
      --json benchmarks/results/moe_h100.json --table benchmarks/results/moe_h100.md

--mode ab: the whole Triton expert path of another version of the package (omni_ep_base, written by
benchmarks/make_baseline_package.sh into .ab_base/, with its own tuned files) against this one's, in one process
on the same inputs, interleaved as above; outputs must be bitwise equal, or within 1e-2 of fp32 at the --changed
points (whose kernels differ). Exit code 1 when outputs disagree.

  bash benchmarks/make_baseline_package.sh 4f8aa63
  python benchmarks/bench_moe.py --mode ab --points 64:8194 32:8194 64:4097 --changed 64:4097 --json ab.json

--mode shared-mlp: the shared MLP, replicated vs a TP share, next to the routed experts (shared_mlp_main).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from omni_ep.layers.fused_moe.experts.torch_experts import TorchExperts  # noqa: E402
from omni_ep.layers.fused_moe.experts.triton_experts import TritonExperts  # noqa: E402
from omni_ep.layers.fused_moe.experts.triton_kernels.align import align_pairs_to_blocks  # noqa: E402
from omni_ep.layers.fused_moe.experts.triton_kernels.down_unpermute import down_unpermute  # noqa: E402
from omni_ep.layers.fused_moe.experts.triton_kernels.gate_up_swiglu import gate_up_swiglu  # noqa: E402
from omni_ep.layers.fused_moe.experts.triton_kernels.topk_sum import topk_sum  # noqa: E402
from omni_ep.layers.fused_moe.fp8 import quantize_rows  # noqa: E402

NUM_GLOBAL_EXPERTS = 64


def ep_routing(num_tokens: int, num_local: int, top_k: int, device, generator: torch.Generator):
    """Routing seen by EP rank 0: ids [T, K] local id or -1, weights [T, K] fp32 (softmax, top-k, renormalised)."""
    logits = torch.randn(num_tokens, NUM_GLOBAL_EXPERTS, device=device, generator=generator)
    weights, ids = torch.topk(torch.softmax(logits, dim=-1), top_k, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)
    ids = torch.where(ids < num_local, ids, -1).to(torch.int32)
    return ids, weights


def expert_weights(num_local: int, hidden: int, inter: int, dtype, device, generator: torch.Generator):
    """w13 [E, 2I, H] (gate rows, then up rows), w2 [E, H, I], scaled like a trained layer (unit-ish outputs)."""
    w13 = torch.randn(num_local, 2 * inter, hidden, device=device, dtype=dtype, generator=generator) * hidden**-0.5
    w2 = torch.randn(num_local, hidden, inter, device=device, dtype=dtype, generator=generator) * inter**-0.5
    return w13, w2


def median_ms(fn, budget_ms: float = 300.0, min_runs: int = 5, max_runs: int = 200) -> float:
    """Median per-call time from CUDA events around each of many back-to-back calls, after a warm-up.

    The host does not wait between calls, as in a model where the next layer's launches queue behind this
    one; a host sync inside fn (counts read back, say) still stalls it, and that cost is counted."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    estimate_ms = (time.perf_counter() - t0) * 1e3
    runs = int(min(max_runs, max(min_runs, budget_ms / max(estimate_ms, 1e-3))))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(runs)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(runs)]
    for start, end in zip(starts, ends):
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def interleaved_ms(fns: dict, budget_ms: float = 300.0, rounds: int = 5, max_calls: int = 100,
                   settle_ms: float = 200.0) -> dict[str, list]:
    """Per-call ms of every fn in each of `rounds` rounds, the fns taking turns inside every round (the order
    reversed every other round).

    Why: a card at its power cap (the lent H100s and H200s: 600-700 W, SM clock down to 1.3-1.5 GHz under
    load) runs each kernel at the clock its power draw allows, and its power control lags, so a kernel timed
    right after another one partly runs at the other one's clock. Each slot therefore first runs its fn untimed
    for settle_ms, then times about budget_ms / rounds of back-to-back calls between two CUDA events: closer to
    the steady state at the cap, which is what a long run of MoE layers sees."""
    estimate = {}
    for name, fn in fns.items():
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        estimate[name] = max((time.perf_counter() - t0) * 1e3, 1e-3)
    calls = {n: int(min(max_calls, max(1, budget_ms / rounds / e))) for n, e in estimate.items()}
    settle = {n: int(min(5000, settle_ms / e)) for n, e in estimate.items()}
    times = {name: [] for name in fns}
    for r in range(rounds):
        order = list(fns) if r % 2 == 0 else list(fns)[::-1]
        for name in order:
            fn = fns[name]
            for _ in range(settle[name]):
                fn()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls[name]):
                fn()
            end.record()
            end.synchronize()
            times[name].append(start.elapsed_time(end) / calls[name])
    return times


def run_meta() -> dict:
    """Device, versions, date and the command line of this run, for the JSON a script writes."""
    import triton

    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return {"device": torch.cuda.get_device_name(), "python": platform.python_version(), "torch": torch.__version__,
            "triton": triton.__version__, "date": date, "command": "python " + " ".join(sys.argv)}


def paired_ratio(times: dict[str, list], name: str, baseline: str) -> float:
    """Median over rounds of baseline time / name time (> 1: name is faster), from interleaved_ms."""
    return statistics.median(b / t for t, b in zip(times[name], times[baseline]))


def dense_dispatch_loop(x_MH, ids_MK, weights_MK, w13, w2):
    """Per-expert loop over a dense dispatch tensor [M, E, C] (C = busiest expert's load), as the official
    HunyuanImage-3.0 eager MoE does: einsum dispatch, one MLP per expert on its C rows, einsum combine."""
    M, K = ids_MK.shape
    E = w13.shape[0]
    local_P = ids_MK.reshape(-1) >= 0
    expert_P = torch.where(local_P, ids_MK.reshape(-1), E).long()
    one_hot_PE = F.one_hot(expert_P, E + 1)[:, :E]
    position_P = ((one_hot_PE.cumsum(0) - 1) * one_hot_PE).sum(1)
    capacity = int(one_hot_PE.sum(0).max())  # host sync, as in the original
    token_P = torch.arange(M * K, device=x_MH.device) // K
    dispatch_MEC = x_MH.new_zeros(M, E, max(capacity, 1))
    combine_MEC = x_MH.new_zeros(M, E, max(capacity, 1))
    index = (token_P[local_P], expert_P[local_P], position_P[local_P])
    dispatch_MEC[index] = 1
    combine_MEC[index] = weights_MK.reshape(-1)[local_P].to(x_MH.dtype)
    x_ECH = torch.einsum("mec,mh->ech", dispatch_MEC, x_MH)
    outs = []
    for e in range(E):
        gate, up = (x_ECH[e] @ w13[e].t()).chunk(2, dim=-1)
        outs.append((F.silu(gate) * up) @ w2[e].t())
    return torch.einsum("mec,ech->mh", combine_MEC, torch.stack(outs))


def hf_experts(num_local: int, hidden: int, inter: int, top_k: int, w13, w2):
    """transformers' HunYuanMoEV1Experts holding the same weight tensors, one per implementation it offers."""
    from transformers import HunYuanMoEV1Config
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    from transformers.models.hunyuan_v1_moe.modeling_hunyuan_v1_moe import HunYuanMoEV1Experts

    impls = ["eager"] + [name for name in ("grouped_mm", "batched_mm") if name in ALL_EXPERTS_FUNCTIONS]
    modules = {}
    for impl in impls:
        config = HunYuanMoEV1Config(
            hidden_size=hidden, intermediate_size=inter, num_experts=num_local, moe_topk=top_k, hidden_act="silu"
        )
        config._experts_implementation = impl
        with torch.device("meta"):
            module = HunYuanMoEV1Experts(config)
        module.gate_up_proj = torch.nn.Parameter(w13, requires_grad=False)
        module.down_proj = torch.nn.Parameter(w2, requires_grad=False)
        module._is_expert_parallel = num_local < NUM_GLOBAL_EXPERTS
        modules[f"hf_{impl}"] = module
    return modules


def hf_takes_ep_sentinel() -> dict[str, bool]:
    """Whether each transformers implementation accepts the EP sentinel id (== E) for non-local slots.
    Tried on CPU at a tiny size: on CUDA an out-of-range id is a device assert that ends the process."""
    g = torch.Generator().manual_seed(0)
    w13, w2 = expert_weights(2, 16, 16, torch.float32, "cpu", g)
    ids = torch.tensor([[0, 2], [2, 1]])
    accepted = {}
    for name, module in hf_experts(2, 16, 16, 2, w13, w2).items():
        try:
            module(torch.randn(2, 16, generator=g), ids, torch.rand(2, 2, generator=g))
            accepted[name] = True
        except Exception:
            accepted[name] = False
    return accepted


def triton_stages_ms(x, ids, weights, w13, w2, config_dir, budget_ms) -> dict:
    """Median ms of each Triton stage alone (align, gate_up, down, top-k sum), with the config apply() picks."""
    experts = TritonExperts(config_dir=config_dir)
    config = experts.config_for(x, w13.shape[0], w2.shape[2])
    sms = experts.num_sms(x.device)
    align = align_pairs_to_blocks(ids, w13.shape[0], config.block_m)
    h = gate_up_swiglu(x, w13, align, ids.shape[1], config.gate_up, sms)
    y, row_of_pair = down_unpermute(h, w2, weights, align, config.down, sms)
    return {
        "align": median_ms(lambda: align_pairs_to_blocks(ids, w13.shape[0], config.block_m), budget_ms),
        "gate_up": median_ms(lambda: gate_up_swiglu(x, w13, align, ids.shape[1], config.gate_up, sms), budget_ms),
        "down": median_ms(lambda: down_unpermute(h, w2, weights, align, config.down, sms), budget_ms),
        "topk_sum": median_ms(lambda: topk_sum(y, ids, w13.shape[0], row_of_pair), budget_ms),
        "config": config.to_dict(),
    }


def quantized_weights(w13, w2):
    """(w13_q, w2_q, w13_scale, w2_scale): each expert's rows to FP8 as FusedMoE's loader does, one at a time."""
    (w13_q, w13_s), (w2_q, w2_s) = (zip(*(quantize_rows(w[e]) for e in range(w.shape[0]))) for w in (w13, w2))
    return torch.stack(w13_q), torch.stack(w2_q), torch.stack(w13_s), torch.stack(w2_s)


def fp8_gate_up_gemm_ms(x, ids, w_fp8, budget_ms) -> dict:
    """The FP8 gate_up grouped GEMM alone (fp8_grouped_gemm.py's operands), with fp32 accumulation (shipped) and
    with the tensor cores' own (use_fast_accum), median ms."""
    from omni_ep.layers.fused_moe.experts import fp8_grouped_gemm
    from omni_ep.layers.fused_moe.experts.triton_kernels.quantize_rows import quantize_rows_fp8

    w13_q, _, w13_s, _ = w_fp8
    E = w13_q.shape[0]
    align = align_pairs_to_blocks(ids, E, fp8_grouped_gemm.BLOCK_M)
    rows = align.sorted_pair_R.numel()
    a_q, a_s = quantize_rows_fp8(torch.randn(rows, x.shape[1], device=x.device, dtype=x.dtype))
    return {name: median_ms(lambda fast=fast: torch._scaled_grouped_mm(
                a_q, w13_q.transpose(1, 2), a_s, w13_s, offs=align.expert_end_E, out_dtype=torch.bfloat16,
                use_fast_accum=fast),
                budget_ms)
            for name, fast in (("fp32_accumulation", False), ("fast_accumulation", True))}


def bench_case(num_tokens: int, num_local: int, args, generator, w13, w2, contenders: set[str]) -> dict:
    H, I, K = args.hidden, args.intermediate, args.top_k
    dev = "cuda"
    x = torch.randn(num_tokens, H, device=dev, dtype=torch.bfloat16, generator=generator)
    ids, weights = ep_routing(num_tokens, num_local, K, dev, generator)
    pairs = int((ids >= 0).sum())
    flops = 2 * 3 * H * I * pairs
    ids_sentinel = torch.where(ids >= 0, ids, num_local).long()  # transformers' EP sentinel: id == E
    w_fp8 = quantized_weights(w13, w2) if "triton_fp8" in contenders else None
    fns = {
        "triton": lambda: TritonExperts(config_dir=args.config_dir).apply(x, ids, weights, w13, w2),
        "triton_fp8": lambda: TritonExperts(config_dir=args.config_dir).apply(x, ids, weights, *w_fp8),
        "torch": lambda: TorchExperts().apply(x, ids, weights, w13, w2),
        "dense_loop": lambda: dense_dispatch_loop(x, ids, weights, w13, w2),
    }
    hf_modules = hf_experts(num_local, H, I, K, w13, w2) if "hf" in contenders else {}
    for name, module in hf_modules.items():
        if num_local < NUM_GLOBAL_EXPERTS and not args.hf_sentinel_ok[name]:
            fns[name] = None  # this transformers version cannot skip non-local slots
        else:
            fns[name] = lambda m=module: m(x, ids_sentinel, weights.to(x.dtype))
    a = torch.randn(pairs, H, device=dev, dtype=torch.bfloat16, generator=generator)
    b = torch.randn(H, 3 * I, device=dev, dtype=torch.bfloat16, generator=generator)
    row = {"tokens": num_tokens, "experts_local": num_local, "local_pairs": pairs, "tflop": flops / 1e12}
    results, timed = {}, {"cublas": lambda: a @ b}
    if "triton_fp8" in contenders:
        (a_q, a_scale), (b_q, b_scale) = quantize_rows(a), quantize_rows(b.t().contiguous())
        timed["cublas_fp8"] = lambda: torch._scaled_mm(a_q, b_q.t(), a_scale[:, None], b_scale[None, :],
                                                       out_dtype=torch.bfloat16)
    with torch.inference_mode():
        reference = TorchExperts().apply(x.float(), ids, weights, w13.float(), w2.float())
        for name, fn in fns.items():  # correctness first; the ones that run are timed together below
            if name not in contenders and not (name.startswith("hf_") and "hf" in contenders):
                continue
            if fn is None:
                results[name] = {"error": "no EP: rejects the non-local sentinel id in this transformers version"}
                continue
            try:
                err = ((fn().float() - reference).norm() / reference.norm()).item()
                results[name] = {"rel_err_vs_fp32": err}
                timed[name] = fn
            except Exception as exc:  # report and go on: one broken contender must not hide the others
                results[name] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
            torch.cuda.empty_cache()
        del reference
        times = interleaved_ms(timed, args.budget_ms, args.rounds, settle_ms=args.settle_ms)
        for name in timed:
            ms = statistics.median(times[name])
            results.setdefault(name, {}).update(
                ms=ms, tflops=flops / ms / 1e9, vs_ceiling=paired_ratio(times, name, "cublas"), rounds_ms=times[name])
        if "triton_fp8" in results and "ms" in results["triton_fp8"]:
            results["triton_fp8"]["gate_up_gemm_ms"] = fp8_gate_up_gemm_ms(x, ids, w_fp8, args.budget_ms)
        if "triton" in results and "ms" in results["triton"]:
            results["triton"]["stages_ms"] = triton_stages_ms(x, ids, weights, w13, w2, args.config_dir, args.budget_ms)
    row["results"] = results
    return row


def table(rows: list[dict]) -> str:
    names = []
    for row in rows:
        names += [n for n in row["results"] if n not in names]
    head = "| T | E_local | local pairs | " + " | ".join(f"{n} TFLOP/s (x ceil)" for n in names) + " |"
    lines = [head, "|" + "---|" * (3 + len(names))]
    for row in rows:
        cells = []
        for n in names:
            r = row["results"].get(n, {})
            if "tflops" in r:
                cells.append(f"{r['tflops']:.0f} ({r['vs_ceiling']:.2f}) {r['ms']:.2f} ms")
            else:
                cells.append(r.get("error", "-")[:40])
        lines.append(f"| {row['tokens']} | {row['experts_local']} | {row['local_pairs']} | " + " | ".join(cells) + " |")
    lines += ["", "Triton stages alone (median ms): align / gate_up / down / topk_sum", ""]
    for row in rows:
        fp8_gemm = row["results"].get("triton_fp8", {}).get("gate_up_gemm_ms")
        if fp8_gemm:
            lines.append(f"- T={row['tokens']} E_local={row['experts_local']}: FP8 gate_up GEMM alone, fp32 / fast "
                         f"accumulation {fp8_gemm['fp32_accumulation']:.3f} / {fp8_gemm['fast_accumulation']:.3f} ms")
        stages = row["results"].get("triton", {}).get("stages_ms")
        if stages:
            parts = " / ".join(f"{stages[k]:.3f}" for k in ("align", "gate_up", "down", "topk_sum"))
            lines.append(f"- T={row['tokens']} E_local={row['experts_local']}: {parts}")
    return "\n".join(lines)


def ab_case(num_local: int, num_tokens: int, args, generator, baseline_cls, changed: bool) -> dict:
    """The whole expert path of the baseline package (its own configs) against this one's, same inputs, timed in
    interleaved rounds. Outputs must be bitwise equal, or, where the point's kernels changed, within 1e-2 of an
    fp32 reference (as the baseline's are)."""
    from omni_ep.layers.fused_moe.experts.triton_kernels.down_unpermute import down_kernel
    from omni_ep.layers.fused_moe.experts.triton_kernels.gate_up_swiglu import gate_up_kernel

    H, I, K = args.hidden, args.intermediate, args.top_k
    w13, w2 = expert_weights(num_local, H, I, torch.bfloat16, "cuda", generator)
    x = torch.randn(num_tokens, H, device="cuda", dtype=torch.bfloat16, generator=generator)
    ids, weights = ep_routing(num_tokens, num_local, K, "cuda", generator)
    flops = 2 * 3 * H * I * int((ids >= 0).sum())
    baseline, current = baseline_cls(), TritonExperts(config_dir=args.config_dir)
    config = current.config_for(x, num_local, I)
    down, sorted_rows = down_kernel(x.new_empty(config.block_m, I), w2, config.block_m, config.down)
    kernels = f"{gate_up_kernel(x, w13, config.block_m, config.gate_up)} / {down}{' sorted' if sorted_rows else ''}"
    with torch.inference_mode():
        ref = TorchExperts().apply(x.float(), ids, weights, w13.float(), w2.float())
        out_baseline = baseline.apply(x, ids, weights, w13, w2)
        out_current = current.apply(x, ids, weights, w13, w2)
        err = {name: ((out.float() - ref).norm() / ref.norm()).item()
               for name, out in (("baseline", out_baseline), ("current", out_current))}
        bitwise = torch.equal(out_baseline, out_current)
        del ref, out_baseline, out_current
        times = interleaved_ms({"baseline": lambda: baseline.apply(x, ids, weights, w13, w2),
                                "current": lambda: current.apply(x, ids, weights, w13, w2)},
                               args.budget_ms, args.rounds, settle_ms=args.settle_ms)
    speed = paired_ratio(times, "current", "baseline")
    outputs_ok = bitwise or (changed and err["current"] < 1e-2)
    return {"experts_local": num_local, "tokens": num_tokens, "changed": changed, "kernels": kernels,
            "config_baseline": baseline.config_for(x, num_local, I).to_dict(), "config_current": config.to_dict(),
            "ms_baseline": statistics.median(times["baseline"]), "ms_current": statistics.median(times["current"]),
            "tflops_current": flops / statistics.median(times["current"]) / 1e9, "speed_current_over_baseline": speed,
            "rounds_ms": times, "bitwise_equal": bitwise, "rel_err_vs_fp32": err, "outputs_ok": outputs_ok,
            "within_2pct": speed >= 0.98}


def ab_table(rows: list[dict]) -> str:
    lines = ["| E_local | T | kernels now (gate_up / down) | path changed | baseline ms | current ms | TFLOP/s now "
             "| speed now / baseline | outputs | verdict |", "|" + "---|" * 10]
    for r in rows:
        outputs = "bitwise equal" if r["bitwise_equal"] else f"rel err {r['rel_err_vs_fp32']['current']:.1e} vs fp32"
        verdict = "ok" if r["outputs_ok"] and r["within_2pct"] else (
            "OUTPUTS DIFFER" if not r["outputs_ok"] else "SLOWER THAN 2%")
        lines.append(f"| {r['experts_local']} | {r['tokens']} | {r['kernels']} | {'yes' if r['changed'] else 'no'} "
                     f"| {r['ms_baseline']:.3f} | {r['ms_current']:.3f} | {r['tflops_current']:.0f} "
                     f"| x{r['speed_current_over_baseline']:.3f} | {outputs} | {verdict} |")
    return "\n".join(lines)


def ab_main(args) -> int:
    """--mode ab: the baseline package's experts (make_baseline_package.sh) against this package's."""
    sys.path.insert(0, str(args.baseline.resolve()))
    try:
        from omni_ep_base.layers.fused_moe.experts.triton_experts import TritonExperts as BaselineExperts
    except ImportError:
        sys.exit(f"no omni_ep_base under {args.baseline}: run benchmarks/make_baseline_package.sh first.")
    points = [tuple(int(v) for v in p.split(":")) for p in args.points]
    changed = {tuple(int(v) for v in p.split(":")) for p in args.changed}
    generator = torch.Generator("cuda").manual_seed(args.seed)
    rows = []
    for num_local, num_tokens in points:
        row = ab_case(num_local, num_tokens, args, generator, BaselineExperts, (num_local, num_tokens) in changed)
        rows.append(row)
        print(ab_table([row]).splitlines()[-1], flush=True)
        torch.cuda.empty_cache()
    meta = {**run_meta(), "baseline": (args.baseline / "omni_ep_base.COMMIT").read_text().strip()}
    text = ab_table(rows)
    print(f"\n{meta['device']}, torch {meta['torch']}, triton {meta['triton']}; baseline {meta['baseline']}\n{text}")
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    if args.table:
        args.table.write_text(f"# Whole expert path: {meta['baseline']} (baseline) vs this tree (current)\n\n"
                              f"{json.dumps(meta, indent=1)}\n\nSame process, same inputs, interleaved rounds at "
                              f"steady state (bench_moe.interleaved_ms); speed = median of per-round "
                              f"baseline / current times.\n\n{text}\n")
    return 0 if all(r["outputs_ok"] for r in rows) else 1


def shared_mlp_main(args) -> None:
    """--mode shared-mlp: the shared MLP of a HunyuanImage-3.0 MoE layer, replicated (what omni_ep runs) vs the
    per-rank share a tensor-parallel split would compute (I / TP), next to the routed experts of the same layer.
    A TP split would add no collective (its partial output joins the layer's one TP collective), so the
    difference is compute alone."""
    from triton.testing import do_bench

    from omni_ep.config import ParallelConfig
    from omni_ep.distributed import destroy_parallel_state, init_parallel_state
    from omni_ep.models.hunyuan_image3.moe import HunyuanImage3SharedMLP, fused_moe_class

    init_parallel_state(ParallelConfig())
    H, I, E, dev, dtype = args.hidden, args.intermediate, NUM_GLOBAL_EXPERTS, torch.device("cuda"), torch.bfloat16
    experts = fused_moe_class()(num_experts=E, top_k=args.top_k, hidden_size=H, intermediate_size=I,
                              params_dtype=dtype).to(dev)
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
                             shared_over_routed=ms / routed_ms))
    destroy_parallel_state()
    print(f"{torch.cuda.get_device_name()} | shared MLP (I={I}) per-rank share vs routed experts "
          f"({E} experts top-{args.top_k}, {experts.experts.name} experts), bf16")
    print(f"{'tokens':>7s} {'share':>6s} {'shared ms':>10s} {'routed ms':>10s} {'shared/routed':>14s}")
    for r in rows:
        print(f"{r['tokens']:7d} {'1/' + str(r['tp_share']):>6s} {r['shared_mlp_ms']:10.3f} "
              f"{r['routed_experts_ms']:10.3f} {r['shared_over_routed']:14.3f}")
    if args.json:
        args.json.write_text(json.dumps({"meta": run_meta(), "rows": rows}, indent=2))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["compare", "ab", "shared-mlp"], default="compare")
    p.add_argument("--tokens", type=int, nargs="+", default=[1024, 4097, 8194, 16388])
    p.add_argument("--experts", type=int, nargs="+", default=[64, 32, 16, 8], help="E_local = 64 / EP")
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=3072)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--contenders", nargs="+", default=["triton", "torch", "hf", "dense_loop"])
    p.add_argument("--config-dir", type=Path, default=None, help="tuned JSON files (default: the package's)")
    p.add_argument("--budget-ms", type=float, default=300.0, help="timed milliseconds per contender and shape")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds the budget is split into")
    p.add_argument("--settle-ms", type=float, default=200.0, help="untimed run before each timed slot")
    p.add_argument("--points", nargs="+", default=["64:8194", "32:8194"], help="--mode ab: E_local:T")
    p.add_argument("--changed", nargs="*", default=[], help="--mode ab: points whose kernels changed (E_local:T)")
    p.add_argument("--baseline", type=Path, default=Path(__file__).resolve().parents[1] / ".ab_base",
                   help="--mode ab: the folder holding omni_ep_base (make_baseline_package.sh)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--table", type=Path, default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_moe.py times CUDA kernels: run it on a machine with a CUDA GPU.")
    if args.mode == "ab":
        sys.exit(ab_main(args))
    if args.mode == "shared-mlp":
        return shared_mlp_main(args)
    for e in args.experts:
        if not 1 <= e <= NUM_GLOBAL_EXPERTS or NUM_GLOBAL_EXPERTS % e:
            sys.exit(f"--experts {e}: E_local must divide {NUM_GLOBAL_EXPERTS} (E_local = 64 / EP).")
    generator = torch.Generator("cuda").manual_seed(args.seed)
    args.hf_sentinel_ok = hf_takes_ep_sentinel() if "hf" in args.contenders else {}
    rows = []
    for num_local in args.experts:
        w13, w2 = expert_weights(num_local, args.hidden, args.intermediate, torch.bfloat16, "cuda", generator)
        for t in args.tokens:
            row = bench_case(t, num_local, args, generator, w13, w2, set(args.contenders))
            rows.append(row)
            print(json.dumps(row), flush=True)
        del w13, w2
        torch.cuda.empty_cache()
    import transformers

    meta = {**run_meta(), "transformers": transformers.__version__,
            "shapes": {"hidden": args.hidden, "intermediate": args.intermediate, "top_k": args.top_k,
                       "global_experts": NUM_GLOBAL_EXPERTS, "dtype": "bfloat16"},
            "flops": "2*3*H*I per LOCAL (token, expert) pair; EP rank 0 of 64/E_local, non-local slots are -1"}
    text = table(rows)
    print(f"\n{meta['device']}  {meta['date']}  torch {meta['torch']} triton {meta['triton']}")
    print(meta["flops"])
    print(text)
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    if args.table:
        args.table.write_text(
            f"# MoE routed-expert throughput\n\n{json.dumps(meta, indent=1)}\n\nEach cell: TFLOP/s (ratio to the "
            f"cuBLAS ceiling) and median ms.\n\n{text}\n"
        )


if __name__ == "__main__":
    main()
