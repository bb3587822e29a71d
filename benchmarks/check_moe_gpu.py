"""GPU correctness of TritonExperts at HunyuanImage-3.0 shapes: bf16 output against an fp32 reference.

Every case draws fresh random inputs; the caching allocator is filled with NaN before each run, so an output
element the kernels fail to write shows up as NaN. Routing includes EP (-1 slots), skewed loads, experts with
zero tokens and tokens with no local slot. Pass: relative error < 1e-2 (bf16/fp16), < 1e-5 (fp32), all finite,
and two runs bitwise equal. Exit code 1 on any failure.

  python benchmarks/check_moe_gpu.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_moe import ep_routing, expert_weights  # noqa: E402

from omni_ep.layers.fused_moe.experts.torch_experts import TorchExperts  # noqa: E402
from omni_ep.layers.fused_moe.experts.triton_configs import default_config  # noqa: E402
from omni_ep.layers.fused_moe.experts.triton_experts import TritonExperts  # noqa: E402
from omni_ep.layers.fused_moe.experts.triton_kernels.gemm_tiles import gluon_module  # noqa: E402


def poison_allocator(num_bytes: int = 4 << 30):
    """Fill the memory the caching allocator will hand out next with NaN."""
    block = torch.empty(num_bytes // 2, dtype=torch.bfloat16, device="cuda")
    block.fill_(float("nan"))
    del block


def skew(ids: torch.Tensor, num_local: int, generator) -> torch.Tensor:
    """Send most first slots to expert 0, and empty experts 1 and 2 (their slots become -1)."""
    ids = ids.clone()
    hot = torch.rand(ids.shape[0], device=ids.device, generator=generator) < 0.9
    ids[:, 0] = torch.where(hot, 0, ids[:, 0])
    if num_local > 3:
        ids = torch.where((ids == 1) | (ids == 2), -1, ids)
    return ids


def run_case(name, M, E, H, I, dtype, routing, config, generator) -> bool:
    x = torch.randn(M, H, device="cuda", dtype=dtype, generator=generator)
    w13, w2 = expert_weights(E, H, I, dtype, "cuda", generator)
    ids, weights = ep_routing(M, E, 8, "cuda", generator)
    if routing == "skewed":
        ids = skew(ids, E, generator)
    elif routing == "no_local_rows":
        ids[: M // 2] = -1
    experts = TritonExperts(config)
    outs = []
    for _ in range(2):
        poison_allocator()
        outs.append(experts.apply(x, ids, weights, w13, w2))
    torch.cuda.synchronize()
    gluon_ok, gluon_note = True, ""
    if config is not None and config["down"].get("GLUON"):
        # The Gluon down kernel must run here (a Hopper GPU) and agree bit for bit with the Triton one.
        gluon = gluon_module("down_unpermute_gluon")
        runs = gluon is not None and gluon.gluon_fits(x, config["BLOCK_M"], config["down"],
                                                      config["down"].get("SORTED_Y", False))
        triton_out = TritonExperts({**config, "down": {**config["down"], "GLUON": False}}).apply(
            x, ids, weights, w13, w2)
        gluon_ok = runs and torch.equal(outs[0], triton_out)
        gluon_note = f" gluon_ran={runs} same_as_triton_down={torch.equal(outs[0], triton_out)}"
    if config is not None and config["gate_up"].get("GLUON"):
        # The Gluon gate_up kernel must run here and agree bit for bit with the Triton ONE_DOT kernel.
        gluon = gluon_module("gate_up_swiglu_gluon")
        runs = gluon is not None and gluon.gluon_gate_up_fits(x, w13, config["BLOCK_M"], config["gate_up"])
        should_run = I % config["gate_up"]["BLOCK_N"] == 0  # otherwise the Triton kernel runs instead
        triton_gate_up = {**config["gate_up"], "GLUON": False, "ONE_DOT": True, "SORTED_X": True}
        triton_out = TritonExperts({**config, "gate_up": triton_gate_up}).apply(
            x, ids, weights, w13, w2)
        same = torch.equal(outs[0], triton_out)
        gluon_ok = gluon_ok and runs == should_run and same
        gluon_note += f" gate_up_gluon_ran={runs} same_as_triton_gate_up={same}"
    ref = TorchExperts().apply(x.float(), ids, weights, w13.float(), w2.float())
    out = outs[0]
    err = ((out.float() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    finite = bool(torch.isfinite(out).all())
    same = torch.equal(outs[0], outs[1])
    empty_rows_zero = bool((out[(ids < 0).all(1)] == 0).all())
    ok = err < tol and finite and same and empty_rows_zero and gluon_ok and out.shape == (M, H) and out.dtype == dtype
    counts = torch.bincount(ids[ids >= 0].long(), minlength=E)
    print(f"{'PASS' if ok else 'FAIL'} {name:28s} M={M:5d} E={E:2d} {str(dtype):15s} rel_err={err:.2e} "
          f"finite={finite} deterministic={same} rows/expert min={int(counts.min())} max={int(counts.max())}"
          f"{gluon_note}",
          flush=True)
    return ok


def gluon_down(block_m: int, block_n: int, num_warps: int, num_stages: int, sorted_y: bool = False) -> dict:
    """A TMA config whose down GEMM runs the Gluon kernel (BLOCK_M = 16 rows per warp); sorted_y: it writes
    expert-sorted rows by TMA stores."""
    gate_up = {**default_config(4096)["gate_up"], "num_stages": 3, "TMA": True, "ONE_DOT": True}
    down = {"BLOCK_N": block_n, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": num_warps, "num_stages": num_stages,
            "TMA": True, "GLUON": True, "SORTED_Y": sorted_y}
    return {"BLOCK_M": block_m, "gate_up": gate_up, "down": down}


def gluon_gate_up(block_m: int, num_stages: int) -> dict:
    """A config whose gate_up GEMM runs the Gluon kernel (loads from a warp of their own) and whose down GEMM runs
    the Gluon sorted-y kernel."""
    gate_up = {"BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": block_m // 16, "num_stages": num_stages,
               "TMA": True, "ONE_DOT": True, "GLUON": True}
    return {**gluon_down(block_m, 256 if block_m == 128 else 128, block_m // 16, 3, True), "gate_up": gate_up}


def main():
    if not torch.cuda.is_available():
        sys.exit("check_moe_gpu.py needs a CUDA GPU.")
    torch.backends.cuda.matmul.allow_tf32 = False
    g = torch.Generator("cuda").manual_seed(1234)
    bf16, H, I = torch.bfloat16, 4096, 3072
    small = {"BLOCK_M": 16, "gate_up": default_config(16)["gate_up"], "down": default_config(16)["down"]}
    cases = [
        ("one token", 1, 64, H, I, bf16, "uniform", None),
        ("EP=8 small", 100, 8, H, I, bf16, "uniform", None),
        ("EP=1 4097 tokens", 4097, 64, H, I, bf16, "uniform", None),
        ("EP=2 skewed, empty experts", 2048, 32, H, I, bf16, "skewed", None),
        ("EP=4 half rows non-local", 1025, 16, H, I, bf16, "no_local_rows", None),
        ("EP=1 BLOCK_M 16 config", 300, 64, H, I, bf16, "skewed", small),
        ("EP=1 default large tiles", 3000, 64, H, I, bf16, "uniform", default_config(4096)),
        ("EP=2 one-dot, plain grid", 2500, 32, H, I, bf16, "skewed", {
            "BLOCK_M": 128, "gate_up": {**default_config(4096)["gate_up"], "ONE_DOT": True, "PROGRAMS_PER_SM": 0},
            "down": {**default_config(4096)["down"], "PROGRAMS_PER_SM": 0}}),
        ("EP=1 TMA, one-dot, sorted x", 3001, 64, H, I, bf16, "skewed", {
            "BLOCK_M": 128, "gate_up": {**default_config(4096)["gate_up"], "TMA": True, "ONE_DOT": True,
                                        "SORTED_X": True},
            "down": {**default_config(4096)["down"], "TMA": True}}),
        ("EP=4 TMA, plain grid, odd I", 1500, 16, H, 3000, bf16, "uniform", {
            "BLOCK_M": 64, "gate_up": {**default_config(4096)["gate_up"], "TMA": True, "PROGRAMS_PER_SM": 0},
            "down": {**default_config(4096)["down"], "TMA": True, "PROGRAMS_PER_SM": 0}}),
        ("fp16", 777, 16, H, I, torch.float16, "uniform", None),
        ("fp32 odd sizes", 65, 8, 200, 72, torch.float32, "skewed", None),
        ("EP=2 TMA, warp-specialised", 2049, 32, H, I, bf16, "uniform", {
            "BLOCK_M": 128, "gate_up": {**default_config(4096)["gate_up"], "num_stages": 3, "TMA": True,
                                        "ONE_DOT": True, "SORTED_X": True, "WARP_SPECIALIZE": True},
            "down": {**default_config(4096)["down"], "num_stages": 3, "TMA": True, "WARP_SPECIALIZE": True}}),
        ("EP=1 TMA half tiles 8194", 8194, 64, H, I, bf16, "uniform", {
            "BLOCK_M": 128, "gate_up": {**default_config(4096)["gate_up"], "num_stages": 3, "TMA": True,
                                        "ONE_DOT": True, "HALF_TILES": True},
            "down": {**default_config(4096)["down"], "num_stages": 3, "TMA": True, "HALF_TILES": True}}),
        ("EP=2 half tiles, pointer, skewed", 3001, 32, H, I, bf16, "skewed", {
            "BLOCK_M": 128, "gate_up": {**default_config(4096)["gate_up"], "ONE_DOT": True, "HALF_TILES": True},
            "down": {**default_config(4096)["down"], "HALF_TILES": True}}),
        ("EP=2 flattened loops, TMA store, skewed", 4097, 32, H, I, bf16, "skewed", {
            "BLOCK_M": 128, "gate_up": {**default_config(4096)["gate_up"], "num_stages": 3, "TMA": True,
                                        "ONE_DOT": True, "TMA_STORE": True, "FLATTEN": True},
            "down": {**default_config(4096)["down"], "num_stages": 3, "TMA": True, "FLATTEN": True}}),
        ("EP=4 flattened, TMA store, odd I", 1500, 16, H, 3000, bf16, "no_local_rows", {
            "BLOCK_M": 64, "gate_up": {**default_config(4096)["gate_up"], "TMA": True, "TMA_STORE": True,
                                       "FLATTEN": True},
            "down": {**default_config(4096)["down"], "TMA": True, "FLATTEN": True}}),
        ("EP=1 Gluon down 8194", 8194, 64, H, I, bf16, "uniform", gluon_down(128, 256, 8, 3)),
        ("EP=2 Gluon down, skewed, empty experts", 4097, 32, H, I, bf16, "skewed", gluon_down(128, 256, 8, 3)),
        ("EP=4 Gluon down, odd H and I, non-local", 1500, 16, 4000, 3000, bf16, "no_local_rows",
         gluon_down(64, 128, 4, 4)),
        ("EP=8 Gluon down, few tokens, idle programs", 100, 8, H, I, bf16, "skewed", gluon_down(128, 256, 8, 4)),
        ("fp16 Gluon down", 2049, 16, H, I, torch.float16, "uniform", gluon_down(128, 256, 8, 3)),
        ("EP=1 sorted y 8194", 8194, 64, H, I, bf16, "uniform", {
            "BLOCK_M": 128, "gate_up": {**default_config(4096)["gate_up"], "num_stages": 3, "TMA": True,
                                        "ONE_DOT": True, "SORTED_X": True, "WARP_SPECIALIZE": True},
            "down": {**default_config(4096)["down"], "num_stages": 3, "TMA": True, "SORTED_Y": True}}),
        ("EP=2 sorted y, flattened, skewed, odd I", 3001, 32, H, 3000, bf16, "skewed", {
            "BLOCK_M": 128, "gate_up": {**default_config(4096)["gate_up"], "TMA": True, "ONE_DOT": True},
            "down": {**default_config(4096)["down"], "TMA": True, "SORTED_Y": True, "FLATTEN": True}}),
        ("EP=4 sorted y, odd H, non-local", 1500, 16, 4000, I, bf16, "no_local_rows", {
            "BLOCK_M": 64, "gate_up": {**default_config(4096)["gate_up"], "TMA": True},
            "down": {**default_config(4096)["down"], "TMA": True, "SORTED_Y": True, "PROGRAMS_PER_SM": 0}}),
        ("EP=1 Gluon down, sorted y 8194", 8194, 64, H, I, bf16, "uniform", gluon_down(128, 256, 8, 3, True)),
        ("EP=2 Gluon sorted y, skewed", 4097, 32, H, I, bf16, "skewed", gluon_down(128, 256, 8, 3, True)),
        ("EP=4 Gluon sorted y, odd H, I", 1500, 16, 4000, 3000, bf16, "no_local_rows",
         gluon_down(64, 128, 4, 4, True)),
        ("EP=8 Gluon sorted y, idle programs", 100, 8, H, I, bf16, "skewed", gluon_down(128, 256, 8, 3, True)),
        ("EP=1 Gluon gate_up 8194", 8194, 64, H, I, bf16, "uniform", gluon_gate_up(128, 3)),
        ("EP=2 Gluon gate_up, skewed, empty experts", 4097, 32, H, I, bf16, "skewed", gluon_gate_up(128, 3)),
        ("EP=4 Gluon gate_up 64-row blocks, 4 stages, non-local", 1500, 16, H, I, bf16, "no_local_rows",
         gluon_gate_up(64, 4)),
        ("EP=8 Gluon gate_up, few tokens, idle programs", 100, 8, H, I, bf16, "skewed", gluon_gate_up(128, 3)),
        ("fp16 Gluon gate_up, odd token count", 2049, 16, H, I, torch.float16, "uniform", gluon_gate_up(128, 3)),
        ("EP=1 Gluon gate_up, odd H, 4 stages", 777, 64, 4000, I, bf16, "skewed", gluon_gate_up(128, 4)),
        ("EP=2 Gluon gate_up, I not a multiple of BLOCK_N (falls back)", 1000, 32, H, 3000, bf16, "uniform",
         gluon_gate_up(128, 3)),
    ]
    results = [run_case(*case, generator=g) for case in cases]
    print(f"{sum(results)}/{len(results)} cases passed")
    sys.exit(0 if all(results) else 1)


if __name__ == "__main__":
    main()
