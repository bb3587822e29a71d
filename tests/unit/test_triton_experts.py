"""TritonExperts on CPU: the pointer and tma kernels under TRITON_INTERPRET=1 against the torch reference
(fp32, 1e-5), the alignment, gather and top-k sum kernels against torch, and the typed tile config with the
shipped tuned files.

triton.jit reads TRITON_INTERPRET when a kernel is defined, and other test modules import triton first, so
the kernel cases run in a child process: this file run as a script with the variable set. It prints one
JSON line per case; the tests below check them. The Gluon kernels do not run in the interpreter (tests/gpu/).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from omni_ep.layers.fused_moe.experts.triton_configs import (
    CONFIG_DIR,
    GemmConfig,
    MoEConfig,
    config_file_name,
    default_config,
    device_family,
    fit_fp32,
    load_config_file,
    moe_config,
)

REPO = Path(__file__).resolve().parents[2]
TOL = 1e-5


def _tile(kernel, block_n, block_k, group_m=1, num_warps=4, programs_per_sm=1):
    return GemmConfig(kernel, block_n, block_k, group_m, num_warps, num_stages=2, programs_per_sm=programs_per_sm)


POINTER = MoEConfig(16, _tile("pointer", 16, 32, 2), _tile("pointer", 32, 16))
POINTER_PLAIN_GRID = MoEConfig(32, _tile("pointer", 16, 16, programs_per_sm=0),
                               _tile("pointer", 16, 32, 2, programs_per_sm=0))
# Tensor-descriptor (TMA) loads; the odd-size case makes the last N block read past I (gate_up's [2E, I, H] view
# and down's [E*H, I] view) and the K blocks run past H, which the descriptors must fill with zeros.
TMA = MoEConfig(16, _tile("tma", 16, 32, 2), _tile("tma", 32, 16))
TMA_TWO_PER_SM = MoEConfig(32, _tile("tma", 32, 16, 2, programs_per_sm=2), _tile("tma", 16, 32, programs_per_sm=2))
# The Gluon kernels run on Hopper GPUs only: here both GEMMs fall back to the tma kernels with the same tiles.
GLUON = MoEConfig(64, _tile("gluon", 16, 16, 2), _tile("gluon", 32, 16, 2))

# ----------------------------------------------------------------------------------------------------------
# Child process: the kernel cases (run only with TRITON_INTERPRET=1).


def _routing(M, K, E, gen, local_fraction=0.7):
    ids = torch.randint(0, E, (M, K), generator=gen)
    ids = torch.where(torch.rand(M, K, generator=gen) < local_fraction, ids, -1)
    return ids, torch.rand(M, K, generator=gen)


def _weights(E, H, I, gen):
    return torch.randn(E, 2 * I, H, generator=gen) / H**0.5, torch.randn(E, H, I, generator=gen) / I**0.5


def _run(config, x, ids, w, w13, w2, ref_ids=None, fp8=False):
    """The Triton experts' output against the torch reference's (ref_ids: the ids the reference sees). fp8: both
    with the weights quantized (fp8.py), and fp8_err the quantized output's distance from the exact one."""
    from omni_ep.layers.fused_moe.experts.torch_experts import TorchExperts
    from omni_ep.layers.fused_moe.experts.triton_experts import TritonExperts
    from omni_ep.layers.fused_moe.fp8 import quantize_rows

    ref_ids = ids if ref_ids is None else ref_ids
    scales, extra = (), {}
    if fp8:
        exact = TorchExperts().apply(x, ref_ids, w, w13, w2)
        (w13, w13_scale), (w2, w2_scale) = quantize_rows(w13), quantize_rows(w2)
        scales = (w13_scale, w2_scale)
    out = TritonExperts(config).apply(x, ids, w, w13, w2, *scales)
    ref = TorchExperts().apply(x, ref_ids, w, w13, w2, *scales)
    if fp8:
        extra["fp8_err"] = ((ref - exact).norm() / exact.norm()).item()
    err = ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    return {"rel_err": err, "finite": bool(torch.isfinite(out).all()), "shape_ok": out.shape == ref.shape, **extra}


def _case_uniform(gen, config, fp8=False):
    M, K, E, H, I = 37, 4, 6, 64, 48
    x = torch.randn(M, H, generator=gen)
    w13, w2 = _weights(E, H, I, gen)
    ids, w = _routing(M, K, E, gen)
    return _run(config, x, ids, w, w13, w2, fp8=fp8)


def _case_skewed_empty_experts(gen, config, fp8=False):
    M, K, E, H, I = 50, 3, 8, 32, 32
    x = torch.randn(M, H, generator=gen)
    w13, w2 = _weights(E, H, I, gen)
    ids, w = _routing(M, K, E, gen, local_fraction=1.0)
    ids[:, 0] = 0  # expert 0 gets every token
    ids = torch.where((ids == 3) | (ids == 4), -1, ids)  # experts 3 and 4 get none
    return _run(config, x, ids, w, w13, w2, fp8=fp8)


def _case_odd_sizes_strided(gen, config, fp8=False):
    """H = 40, I = 24 (not tile multiples: masked or zero-filled K steps, wrapped or zero-filled N blocks), int64
    ids, x a row-strided view."""
    M, K, E, H, I = 29, 3, 5, 40, 24
    x = torch.randn(M, H + 8, generator=gen)[:, :H]
    w13, w2 = _weights(E, H, I, gen)
    ids, w = _routing(M, K, E, gen)
    return _run(config, x, ids.long(), w, w13, w2, fp8=fp8)


def _case_quantize_rows(gen):
    """The FP8 row quantization kernel gives fp8.quantize_rows's bits: ties, subnormals, a zero row, rows over
    several binades; with num_rows, the rows before it the same."""
    from omni_ep.layers.fused_moe.experts.triton_kernels.quantize_rows import quantize_rows_fp8
    from omni_ep.layers.fused_moe.fp8 import quantize_rows

    x = torch.randn(24, 300, generator=gen) * torch.logspace(-6, 3, 24)[:, None]
    x[:, ::7] *= 1e-4  # subnormal and zero codes
    x[3] = 0.0
    x[5, :12] = torch.tensor([448.0, 1e-3, 2**-9, 3 * 2**-10, 2**-7 + 2**-11, -5.0625, 17.0, 19.0, 232.0, 31.6,
                              -447.0, 0.0])  # ties to even, carries into the exponent
    q, scale = quantize_rows_fp8(x)
    q_ref, scale_ref = quantize_rows(x)
    tail_q, tail_scale = quantize_rows_fp8(x, torch.tensor([10], dtype=torch.int32))
    bound = x.abs() / 16 + scale[:, None] * 2**-10  # half an e4m3 step, or half the smallest subnormal
    return {"bits_equal": torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(scale, scale_ref),
            "head_equal": torch.equal(tail_q[:10].view(torch.uint8), q_ref[:10].view(torch.uint8)),
            "max_err_ok": bool(((q.float() * scale[:, None] - x).abs() <= bound).all())}


def _case_no_local_slot(gen):
    M, K, E, H, I = 9, 2, 4, 32, 16
    x = torch.randn(M, H, generator=gen)
    w13, w2 = _weights(E, H, I, gen)
    from omni_ep.layers.fused_moe.experts.triton_experts import TritonExperts

    out = TritonExperts(POINTER).apply(x, torch.full((M, K), -1), torch.rand(M, K, generator=gen), w13, w2)
    return {"all_zero": bool((out == 0).all()), "shape_ok": out.shape == (M, H)}


def _case_one_token(gen):
    M, K, E, H, I = 1, 4, 8, 32, 32
    x = torch.randn(M, H, generator=gen)
    w13, w2 = _weights(E, H, I, gen)
    return _run(POINTER, x, torch.tensor([[5, -1, 2, 7]]), torch.rand(M, K, generator=gen), w13, w2)


def _case_zero_tokens(gen):
    E, H, I = 4, 32, 16
    w13, w2 = _weights(E, H, I, gen)
    from omni_ep.layers.fused_moe.experts.triton_experts import TritonExperts

    out = TritonExperts(POINTER).apply(torch.randn(0, H), torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2),
                                       w13, w2)
    return {"shape_ok": out.shape == (0, H)}


def _case_out_of_range_ids_are_not_local(gen):
    M, K, E, H, I = 12, 3, 4, 32, 16
    x = torch.randn(M, H, generator=gen)
    w13, w2 = _weights(E, H, I, gen)
    ids, w = _routing(M, K, E, gen)
    ids[::3, 1] = E + 2
    return _run(POINTER, x, ids, w, w13, w2, ref_ids=torch.where(ids < E, ids, -1))


def _case_alignment_layout(gen):
    """Every local pair once, inside its expert's padded block range; padding rows hold the sentinel P;
    row_of_pair inverts sorted_pair. 2400 pairs: several programs of the counting and placing kernels."""
    from omni_ep.layers.fused_moe.experts.triton_kernels.align import align_pairs_to_blocks

    M, K, E, block_m = 600, 4, 6, 16
    ids, _ = _routing(M, K, E, gen)
    ids[ids == 2] = -1  # an expert with no pair
    a = align_pairs_to_blocks(ids, E, block_m)
    P = M * K
    counts = torch.bincount(ids[ids >= 0], minlength=E)
    padded = (counts + block_m - 1) // block_m * block_m
    start = torch.cumsum(padded, 0) - padded
    used = int(a.num_padded_rows.item())
    rows = a.sorted_pair_R[:used].long()
    ok = used == int(padded.sum())
    ok &= sorted(rows[rows < P].tolist()) == sorted(torch.nonzero(ids.reshape(-1) >= 0).flatten().tolist())
    for e in range(E):
        chunk = rows[start[e]: start[e] + padded[e]]
        ok &= bool((ids.reshape(-1)[chunk[: counts[e]]] == e).all()) and bool((chunk[counts[e]:] == P).all())
        blocks = a.block_expert_B[start[e] // block_m: (start[e] + padded[e]) // block_m]
        ok &= bool((blocks == e).all())
    local = torch.nonzero(ids.reshape(-1) >= 0).flatten()
    ok &= bool((a.sorted_pair_R[a.row_of_pair_P[local].long()] == local).all())  # the inverse map
    ok &= bool((a.row_of_pair_P[ids.reshape(-1) < 0] == -1).all())
    ok &= a.expert_end_E.tolist() == torch.cumsum(padded, 0).tolist()  # the FP8 grouped GEMM's group offsets
    return {"layout_ok": bool(ok)}


def _case_sorted_rows_and_gathering_topk_sum(gen):
    """gather_sorted_rows (the Gluon gate_up's and the FP8 grouped GEMM's A operand) puts each pair's token row (and
    scale) at its sorted row; the top-k
    sum reading y [R, H] through row_of_pair (the Gluon down kernel's sorted output) sums each token's slots."""
    from omni_ep.layers.fused_moe.experts.triton_kernels.align import align_pairs_to_blocks
    from omni_ep.layers.fused_moe.experts.triton_kernels.gate_up_swiglu import gather_sorted_rows
    from omni_ep.layers.fused_moe.experts.triton_kernels.topk_sum import topk_sum

    M, K, E, H = 40, 3, 5, 700  # H over one 512-column program of the copy
    x = torch.randn(M, H, generator=gen)
    ids, _ = _routing(M, K, E, gen)
    a = align_pairs_to_blocks(ids, E, 16)
    scale = torch.rand(M, generator=gen)
    x_sorted, scale_sorted = gather_sorted_rows(x, a, K, scale)  # with the FP8 tokens' scales
    used = int(a.num_padded_rows.item())
    pairs = a.sorted_pair_R[:used].long()
    real = pairs < M * K
    rows_ok = torch.equal(x_sorted[:used][real], x[pairs[real] // K])
    rows_ok &= torch.equal(scale_sorted[:used][real], scale[pairs[real] // K])
    y = torch.randn(a.sorted_pair_R.numel(), H, generator=gen)
    out = topk_sum(y, ids, E, a.row_of_pair_P)
    local = (ids >= 0).reshape(-1)
    ref = torch.zeros(M * K, H)
    ref[local] = y[a.row_of_pair_P[local].long()]
    err = ((out - ref.view(M, K, H).sum(1)).norm() / ref.norm()).item()
    return {"layout_ok": rows_ok, "rel_err": err, "finite": bool(torch.isfinite(out).all()),
            "shape_ok": out.shape == (M, H)}


def _case_bad_shapes_raise(gen):
    from omni_ep.layers.fused_moe.experts.triton_experts import TritonExperts

    w13, w2 = _weights(2, 32, 16, gen)
    try:
        TritonExperts().apply(torch.randn(3, 48), torch.zeros(3, 2, dtype=torch.long), torch.rand(3, 2), w13, w2)
    except ValueError as exc:
        return {"raised": "shapes do not agree" in str(exc)}
    return {"raised": False}


def _case_swiglu_quantize_and_weighted_topk_sum(gen):
    """The FP8 grouped path's own kernels: SwiGLU of [gate | up] rows quantized (as fp8.quantize_rows of silu(gate)
    * up rounded to bf16, where the interpreter's sigmoid rounds the same: 12 of 20 row scales here differ by one
    bf16 step), and the top-k sum that applies the routing weights."""
    from omni_ep.layers.fused_moe.experts.triton_kernels.align import align_pairs_to_blocks
    from omni_ep.layers.fused_moe.experts.triton_kernels.quantize_rows import quantize_rows_fp8
    from omni_ep.layers.fused_moe.experts.triton_kernels.topk_sum import topk_sum
    from omni_ep.layers.fused_moe.fp8 import quantize_rows

    gate_up = torch.randn(20, 2 * 24, generator=gen).to(torch.bfloat16)
    gate, up = gate_up.float().split(24, dim=1)
    q, scale = quantize_rows_fp8(gate_up, swiglu=True)
    h = gate * torch.sigmoid(gate) * up
    scale_ref = quantize_rows(h.to(torch.bfloat16))[1]
    M, K, E, H = 11, 3, 4, 40
    ids, w = _routing(M, K, E, gen)
    align = align_pairs_to_blocks(ids, E, 16)
    y = torch.randn(align.sorted_pair_R.numel(), H, generator=gen)
    out = topk_sum(y, ids, E, align.row_of_pair_P, w)
    rows = align.row_of_pair_P.long().clamp_min(0).reshape(M, K)
    ref = (y[rows] * (w * (ids >= 0)).unsqueeze(-1)).sum(1)
    return {"max_err_ok": bool(((q.float() * scale[:, None] - h).abs() <= h.abs() * (1 / 16 + 1 / 128)
                                + scale[:, None] * 2**-10).all()) and bool(torch.allclose(scale, scale_ref, rtol=1e-2)),
            "rel_err": ((out - ref).norm() / ref.norm()).item(), "finite": bool(torch.isfinite(out).all()),
            "shape_ok": out.shape == (M, H)}


CASES = {
    "pointer_uniform": lambda g: _case_uniform(g, POINTER),
    "pointer_plain_grid_skewed_empty_experts": lambda g: _case_skewed_empty_experts(g, POINTER_PLAIN_GRID),
    "pointer_odd_sizes_strided_default_config": lambda g: _case_odd_sizes_strided(g, None),
    "tma_uniform": lambda g: _case_uniform(g, TMA),
    "tma_odd_sizes_strided": lambda g: _case_odd_sizes_strided(g, TMA),
    "tma_two_programs_per_sm_skewed_empty_experts": lambda g: _case_skewed_empty_experts(g, TMA_TWO_PER_SM),
    "gluon_falls_back_to_tma_odd_sizes": lambda g: _case_odd_sizes_strided(g, GLUON),
    "fp8_pointer_uniform": lambda g: _case_uniform(g, POINTER, fp8=True),
    "fp8_tma_odd_sizes_strided": lambda g: _case_odd_sizes_strided(g, TMA, fp8=True),
    "fp8_gluon_falls_back_skewed_empty_experts": lambda g: _case_skewed_empty_experts(g, GLUON, fp8=True),
    "fp8_quantize_rows": _case_quantize_rows,
    "fp8_swiglu_quantize_and_weighted_topk_sum": _case_swiglu_quantize_and_weighted_topk_sum,
    "no_local_slot": _case_no_local_slot,
    "one_token": _case_one_token,
    "zero_tokens": _case_zero_tokens,
    "out_of_range_ids_are_not_local": _case_out_of_range_ids_are_not_local,
    "alignment_layout": _case_alignment_layout,
    "sorted_rows_and_gathering_topk_sum": _case_sorted_rows_and_gathering_topk_sum,
    "bad_shapes_raise": _case_bad_shapes_raise,
}


def _run_cases():
    assert os.environ.get("TRITON_INTERPRET") == "1", "run the kernel cases with TRITON_INTERPRET=1"
    for name, case in CASES.items():
        gen = torch.Generator().manual_seed(abs(hash(name)) % 2**31)  # fresh inputs per case
        try:
            result = case(gen)
        except Exception as exc:  # reported to the parent test, which fails with the message
            result = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps({"case": name, **result}), flush=True)


# ----------------------------------------------------------------------------------------------------------
# Parent process: the tests.


@pytest.fixture(scope="module")
def interpreted_cases() -> dict[str, dict]:
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            results[row.pop("case")] = row
    return results


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", list(CASES))
def test_kernels_under_interpreter(interpreted_cases, case):
    result = interpreted_cases[case]
    assert "error" not in result, result["error"]
    if "rel_err" in result:
        assert result["finite"] and result["shape_ok"]
        assert result["rel_err"] < TOL, f"{case}: relative error {result['rel_err']:.2e} vs the torch path"
    if "fp8_err" in result:  # quantized, and not by much: e4m3 keeps 3 mantissa bits
        assert 1e-3 < result["fp8_err"] < 0.1, f"{case}: FP8 output {result['fp8_err']:.2e} from the exact one"
    for key in ("all_zero", "shape_ok", "layout_ok", "raised", "bits_equal", "head_equal", "max_err_ok"):
        if key in result:
            assert result[key], f"{case}: {key} is False"


@pytest.mark.timeout(30)
def test_unsupported_reason():
    from omni_ep.layers.fused_moe.experts.triton_experts import TritonExperts

    assert TritonExperts.unsupported_reason(torch.device("cuda"), torch.bfloat16) is None
    assert "bf16, fp16 or fp32" in TritonExperts.unsupported_reason(torch.device("cuda"), torch.int8)
    if os.environ.get("TRITON_INTERPRET") != "1":
        assert "TRITON_INTERPRET=1" in TritonExperts.unsupported_reason(torch.device("cpu"), torch.float32)


@pytest.mark.timeout(30)
def test_kernel_choice_falls_back_where_a_kernel_cannot_run():
    """Off Hopper (here: CPU tensors) gluon runs the tma kernel; where the copy engine cannot read the weights
    (a non-contiguous view) tma runs the pointer kernel; pointer stays pointer."""
    from omni_ep.layers.fused_moe.experts.triton_kernels.down_unpermute import down_kernel
    from omni_ep.layers.fused_moe.experts.triton_kernels.gate_up_swiglu import gate_up_kernel

    x, h = torch.randn(8, 64), torch.randn(128, 48)
    w13, w2 = torch.randn(2, 96, 64), torch.randn(2, 64, 48)
    w13_strided, w2_strided = torch.randn(2, 96, 128)[:, :, :64], torch.randn(2, 64, 96)[:, :, :48]
    assert gate_up_kernel(x, w13, GLUON.block_m, GLUON.gate_up) == "tma"
    assert gate_up_kernel(x, w13, TMA.block_m, TMA.gate_up) == "tma"
    assert gate_up_kernel(x, w13_strided, GLUON.block_m, GLUON.gate_up) == "pointer"
    assert gate_up_kernel(x, w13, POINTER.block_m, POINTER.gate_up) == "pointer"
    assert down_kernel(h, w2, GLUON.block_m, GLUON.down) == ("tma", False)
    assert down_kernel(h, w2_strided, TMA.block_m, TMA.down) == ("pointer", False)
    assert down_kernel(h, w2, POINTER.block_m, POINTER.down) == ("pointer", False)


# ----------------------------------------------------------------------------------------------------------
# The typed config and the tuned files.

GOOD = {"block_m": 128,
        "gate_up": {"kernel": "gluon", "block_n": 128, "block_k": 64, "group_m": 8, "num_warps": 8, "num_stages": 3},
        "down": {"kernel": "tma", "block_n": 256, "block_k": 64, "group_m": 8, "num_warps": 8, "num_stages": 4,
                 "programs_per_sm": 0}}


def _with(gemm: str | None, **changes) -> dict:
    """GOOD with keys changed (a value None removes the key), at the top level or in one GEMM."""
    data = json.loads(json.dumps(GOOD))
    target = data if gemm is None else data[gemm]
    for key, value in changes.items():
        if value is None:
            del target[key]
        else:
            target[key] = value
    return data


@pytest.mark.timeout(30)
def test_config_round_trips_through_dict():
    config = MoEConfig.from_dict(GOOD)
    assert config.gate_up == GemmConfig("gluon", 128, 64, 8, 8, 3) and config.down.programs_per_sm == 0
    assert MoEConfig.from_dict(config.to_dict()) == config
    assert config.to_dict()["gate_up"]["programs_per_sm"] == 1  # the default is written out
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.block_m = 64


@pytest.mark.timeout(30)
@pytest.mark.parametrize("data, message", [
    (_with("gate_up", BLOCK_N=128), "gate_up: unknown key 'BLOCK_N'"),
    (_with("down", programs_per_SM=2), "down: unknown key 'programs_per_SM'"),
    (_with(None, BLOCK_M=128), "config: unknown key 'BLOCK_M'"),
    (_with("down", num_stages=None), "down: missing key 'num_stages'"),
    (_with("gate_up", kernel="triton"), "gate_up.kernel: unknown kernel 'triton'"),
    (_with("down", block_n=96), "down.block_n: 96 is not a power of two"),
    (_with("down", block_k=8), "down.block_k: 8 is below 16"),
    (_with("gate_up", num_stages=0), "gate_up.num_stages: 0 is below 1"),
    (_with("gate_up", num_stages=1), "gate_up.num_stages: the gluon kernel's ring needs at least 2 stages"),
    (_with("gate_up", group_m=True), "gate_up.group_m: True is not an integer"),
    (_with("down", programs_per_sm=-1), "down.programs_per_sm: -1 is below 0"),
    (_with("gate_up", num_warps=2), "gate_up.num_warps: the gluon kernel runs whole warpgroups"),
    (_with(None, block_m=64), "gate_up.kernel gluon: block_m 64 must be 16 rows per warp"),
    (_with(None, block_m=96), "block_m: 96 is not a power of two"),
    (_with("gate_up", block_n=256), "gate_up.block_n: the gluon kernel's MMA is 512 columns wide"),
])
def test_config_rejects_unknown_keys_and_impossible_values(data, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        MoEConfig.from_dict(data)


@pytest.mark.timeout(30)
def test_triton_experts_takes_a_dict_through_the_typed_config():
    from omni_ep.layers.fused_moe.experts.triton_experts import TritonExperts

    assert TritonExperts(GOOD).config == MoEConfig.from_dict(GOOD)
    with pytest.raises(ValueError, match="gate_up: unknown key 'TMA'"):
        TritonExperts(_with("gate_up", TMA=True))


@pytest.mark.timeout(30)
def test_fp32_fit_and_default_config():
    fit = fit_fp32(MoEConfig.from_dict(GOOD))
    assert (fit.gate_up.block_k, fit.gate_up.num_stages, fit.down.block_k, fit.down.num_stages) == (32, 3, 32, 3)
    assert fit.gate_up.kernel == "gluon" and fit.down.programs_per_sm == 0 and fit.block_m == 128
    for tokens, block_m in ((1, 16), (200, 64), (5000, 128)):
        config = default_config(tokens)
        assert config.block_m == block_m
        assert config.gate_up.kernel == config.down.kernel == "pointer"


def _write_table(path: Path, table: dict):
    path.write_text(json.dumps({"_meta": {"device": "test"}, **{str(m): c.to_dict() for m, c in table.items()}}))


@pytest.mark.timeout(30)
def test_config_picks_device_then_family_then_nearest_tokens(tmp_path):
    small, large = default_config(16), default_config(4096)
    _write_table(tmp_path / config_file_name(64, 3072, "NVIDIA H100 80GB HBM3"), {64: small, 8192: large})
    _write_table(tmp_path / config_file_name(8, 3072, "NVIDIA H100 80GB HBM3"), {64: large})
    assert moe_config(64, 3072, 100, "NVIDIA H100 80GB HBM3", tmp_path) == small
    assert moe_config(64, 3072, 6000, "NVIDIA H100 80GB HBM3", tmp_path) == large
    assert moe_config(64, 3072, 6000, "NVIDIA H200", tmp_path) == large  # same family (H) stands in
    assert moe_config(16, 3072, 100, "NVIDIA H100 80GB HBM3", tmp_path) == large  # nearest E is 8
    assert moe_config(64, 3072, 100, "NVIDIA A100-SXM4-80GB", tmp_path) == default_config(100)  # no A file
    assert moe_config(64, 1024, 100, "NVIDIA H100 80GB HBM3", tmp_path) == default_config(100)  # other I
    assert device_family("NVIDIA_H200") == "H" and device_family("NVIDIA A100-SXM4-80GB") == "A"


@pytest.mark.timeout(30)
def test_config_file_errors_name_the_file_and_entry(tmp_path):
    notes = tmp_path / "E8_N64_notes.json"
    notes.write_text(json.dumps({"_meta": {}, "_notes_2026": "history", "64": GOOD}))
    with pytest.raises(ValueError, match="E8_N64_notes.json: unknown key '_notes_2026'"):
        load_config_file(notes)
    typo = tmp_path / "E8_N64_typo.json"
    typo.write_text(json.dumps({"64": GOOD, "4096": _with("down", BLOCK_K=64)}))
    with pytest.raises(ValueError, match="E8_N64_typo.json, entry 4096: down: unknown key 'BLOCK_K'"):
        load_config_file(typo)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("device", ["NVIDIA H100 80GB HBM3", "NVIDIA H200"])
@pytest.mark.parametrize("experts", [64, 32, 16, 8])
def test_shipped_configs_load_and_cover_hunyuan_shapes(device, experts):
    path = CONFIG_DIR / config_file_name(experts, 3072, device)
    assert path.exists(), f"missing tuned file {path.name}"
    table = load_config_file(path)
    assert min(table) <= 64 and max(table) >= 16384
    assert set(json.loads(path.read_text())) - {str(m) for m in table} == {"_meta"}


if __name__ == "__main__":
    _run_cases()
