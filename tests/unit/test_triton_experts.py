"""TritonExperts on CPU: the Triton kernels under TRITON_INTERPRET=1 against the torch reference (fp32, 1e-5),
plus config selection and the shipped tuned files.

triton.jit reads TRITON_INTERPRET when a kernel is defined, and other test modules import triton first, so
the kernel cases run in a child process: this file run as a script with the variable set. It prints one
JSON line per case; the tests below check them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from omni_ep.layers.fused_moe.experts.triton_configs import (
    CONFIG_DIR,
    config_file_name,
    default_config,
    device_family,
    moe_config,
)

REPO = Path(__file__).resolve().parents[2]
TOL = 1e-5


def _tile(block_n, block_k, group_m=1, **extra):
    return {"BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": group_m, "num_warps": 4, "num_stages": 2, **extra}


SMALL_TILES = {"BLOCK_M": 16, "gate_up": _tile(16, 32, 2), "down": _tile(32, 16)}
ONE_DOT_PLAIN_GRID = {"BLOCK_M": 32, "gate_up": _tile(16, 16, 1, ONE_DOT=True, PROGRAMS_PER_SM=0),
                      "down": _tile(16, 32, 2, PROGRAMS_PER_SM=0)}
# Tensor-descriptor (TMA) loads; the odd-size case below makes the last N block read past the gate rows and the
# K blocks run past H, which the descriptors must fill with zeros.
TMA_TILES = {"BLOCK_M": 16, "gate_up": _tile(16, 32, 2, TMA=True), "down": _tile(32, 16, TMA=True)}
TMA_SORTED_X = {"BLOCK_M": 16, "gate_up": _tile(32, 16, 2, TMA=True, SORTED_X=True, WARP_SPECIALIZE=True),
                "down": _tile(16, 32, 1, TMA=True, WARP_SPECIALIZE=True, PROGRAMS_PER_SM=0)}
# The down GEMM writes its tiles in sorted row order by TMA stores; the top-k sum gathers them (the un-permute).
TMA_SORTED_Y = {"BLOCK_M": 16, "gate_up": TMA_SORTED_X["gate_up"], "down": _tile(32, 16, 2, TMA=True, SORTED_Y=True)}
# Half tiles: a row block whose second half is all padding is multiplied as a BLOCK_M/2 tile.
HALF_TILES = {"BLOCK_M": 32, "gate_up": _tile(16, 16, 2, HALF_TILES=True),
              "down": _tile(32, 16, 1, HALF_TILES=True)}
HALF_TILES_TMA_ONE_DOT = {"BLOCK_M": 32, "gate_up": _tile(16, 32, 2, TMA=True, ONE_DOT=True, HALF_TILES=True),
                          "down": _tile(16, 32, 2, TMA=True, HALF_TILES=True)}
TMA_ONE_DOT = {"BLOCK_M": 32, "gate_up": _tile(16, 16, 2, TMA=True, ONE_DOT=True, SORTED_X=True),
               "down": _tile(32, 32, 2, TMA=True)}
# h written by a TMA store (the odd-size case clips its last N block at I); the loops flattened (a compiler
# hint: the interpreter runs them as written, the GPU check runs the compiled form).
TMA_STORE_FLATTEN = {"BLOCK_M": 32, "gate_up": _tile(16, 32, 2, TMA=True, ONE_DOT=True, TMA_STORE=True, FLATTEN=True),
                     "down": _tile(32, 16, 2, TMA=True, FLATTEN=True)}

# GLUON flags name the Hopper-only Gluon kernels: off CUDA both GEMMs must fall back to these Triton kernels.
GLUON_FLAGS = {"BLOCK_M": 16, "gate_up": _tile(16, 16, 2, TMA=True, ONE_DOT=True, SORTED_X=True, GLUON=True),
               "down": _tile(32, 16, 2, TMA=True, SORTED_Y=True, GLUON=True)}

# ----------------------------------------------------------------------------------------------------------
# Child process: the kernel cases (run only with TRITON_INTERPRET=1).


def _routing(M, K, E, gen, local_fraction=0.7):
    ids = torch.randint(0, E, (M, K), generator=gen)
    ids = torch.where(torch.rand(M, K, generator=gen) < local_fraction, ids, -1)
    return ids, torch.rand(M, K, generator=gen)


def _weights(E, H, I, gen):
    return torch.randn(E, 2 * I, H, generator=gen) / H**0.5, torch.randn(E, H, I, generator=gen) / I**0.5


def _compare(out, x, ids, w, w13, w2):
    from omni_ep.layers.fused_moe.experts.torch_experts import TorchExperts

    ref = TorchExperts().apply(x, ids, w, w13, w2)
    err = ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    return {"rel_err": err, "finite": bool(torch.isfinite(out).all()), "shape_ok": out.shape == ref.shape}


def _case_uniform(gen, config=SMALL_TILES):
    M, K, E, H, I = 37, 4, 6, 64, 48
    x = torch.randn(M, H, generator=gen)
    w13, w2 = _weights(E, H, I, gen)
    ids, w = _routing(M, K, E, gen)
    from omni_ep.layers.fused_moe.experts.triton_experts import TritonExperts

    return _compare(TritonExperts(config).apply(x, ids, w, w13, w2), x, ids, w, w13, w2)


def _case_skewed_empty_experts(gen, config=ONE_DOT_PLAIN_GRID):
    M, K, E, H, I = 50, 3, 8, 32, 32
    x = torch.randn(M, H, generator=gen)
    w13, w2 = _weights(E, H, I, gen)
    ids, w = _routing(M, K, E, gen, local_fraction=1.0)
    ids[:, 0] = 0  # expert 0 gets every token
    ids = torch.where((ids == 3) | (ids == 4), -1, ids)  # experts 3 and 4 get none
    from omni_ep.layers.fused_moe.experts.triton_experts import TritonExperts

    return _compare(TritonExperts(config).apply(x, ids, w, w13, w2), x, ids, w, w13, w2)


def _case_no_local_slot(gen):
    M, K, E, H, I = 9, 2, 4, 32, 16
    x = torch.randn(M, H, generator=gen)
    w13, w2 = _weights(E, H, I, gen)
    ids, w = torch.full((M, K), -1), torch.rand(M, K, generator=gen)
    from omni_ep.layers.fused_moe.experts.triton_experts import TritonExperts

    out = TritonExperts(SMALL_TILES).apply(x, ids, w, w13, w2)
    return {"all_zero": bool((out == 0).all()), "shape_ok": out.shape == (M, H)}


def _case_one_token(gen):
    M, K, E, H, I = 1, 4, 8, 32, 32
    x = torch.randn(M, H, generator=gen)
    w13, w2 = _weights(E, H, I, gen)
    ids, w = torch.tensor([[5, -1, 2, 7]]), torch.rand(M, K, generator=gen)
    from omni_ep.layers.fused_moe.experts.triton_experts import TritonExperts

    return _compare(TritonExperts(SMALL_TILES).apply(x, ids, w, w13, w2), x, ids, w, w13, w2)


def _case_zero_tokens(gen):
    E, H, I = 4, 32, 16
    w13, w2 = _weights(E, H, I, gen)
    from omni_ep.layers.fused_moe.experts.triton_experts import TritonExperts

    out = TritonExperts(SMALL_TILES).apply(torch.randn(0, H), torch.zeros(0, 2, dtype=torch.long),
                                           torch.zeros(0, 2), w13, w2)
    return {"shape_ok": out.shape == (0, H)}


def _case_odd_sizes_strided_default_config(gen):
    """H, I not multiples of the tiles (masked K, wrapped N), int64 ids, x a row-strided view, config=None."""
    M, K, E, H, I = 23, 3, 5, 40, 24
    x = torch.randn(M, H + 8, generator=gen)[:, :H]
    w13, w2 = _weights(E, H, I, gen)
    ids, w = _routing(M, K, E, gen)
    from omni_ep.layers.fused_moe.experts.triton_experts import TritonExperts

    return _compare(TritonExperts().apply(x, ids.long(), w, w13, w2), x, ids, w, w13, w2)


def _case_odd_sizes_tma(gen, config):
    """H = 40 and I = 24 (not tile multiples): TMA reads past the tile edges; x a row-strided view."""
    M, K, E, H, I = 29, 3, 5, 40, 24
    x = torch.randn(M, H + 8, generator=gen)[:, :H]
    w13, w2 = _weights(E, H, I, gen)
    ids, w = _routing(M, K, E, gen)
    from omni_ep.layers.fused_moe.experts.triton_experts import TritonExperts

    return _compare(TritonExperts(config).apply(x, ids, w, w13, w2), x, ids, w, w13, w2)


def _case_half_tiles(gen, config):
    """Expert loads 10, 16, 20, 40, 0, 33 rows at BLOCK_M 32: tails in the first half (10, 16, 40 -> 8) take
    the half-tile path, the others the full one; H = 40 also makes TMA K steps run past the end."""
    counts = [10, 16, 20, 40, 0, 33]
    E, K, H, I = len(counts), 2, 40, 32
    slots = torch.cat([torch.full((n,), e) for e, n in enumerate(counts)])
    slots = slots[torch.randperm(slots.numel(), generator=gen)]
    M = slots.numel()  # one local slot per token, the other slot non-local
    ids = torch.stack([slots, torch.full((M,), -1)], 1)
    ids = torch.where(torch.rand(M, generator=gen)[:, None] < 0.5, ids, ids.flip(1))
    x = torch.randn(M, H, generator=gen)
    w13, w2 = _weights(E, H, I, gen)
    w = torch.rand(M, K, generator=gen)
    from omni_ep.layers.fused_moe.experts.triton_experts import TritonExperts

    return _compare(TritonExperts(config).apply(x, ids, w, w13, w2), x, ids, w, w13, w2)


def _case_out_of_range_ids_are_not_local(gen):
    M, K, E, H, I = 12, 3, 4, 32, 16
    x = torch.randn(M, H, generator=gen)
    w13, w2 = _weights(E, H, I, gen)
    ids, w = _routing(M, K, E, gen)
    ids[::3, 1] = E + 2
    from omni_ep.layers.fused_moe.experts.triton_experts import TritonExperts

    out = TritonExperts(SMALL_TILES).apply(x, ids, w, w13, w2)
    return _compare(out, x, torch.where(ids < E, ids, -1), w, w13, w2)


def _case_alignment_layout(gen):
    """Every local pair once, inside its expert's padded block range; padding rows hold the sentinel P;
    row_of_pair inverts sorted_pair.
    2400 pairs: several programs of the counting and placing kernels."""
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
    return {"layout_ok": bool(ok)}


def _case_bad_shapes_raise(gen):
    from omni_ep.layers.fused_moe.experts.triton_experts import TritonExperts

    w13, w2 = _weights(2, 32, 16, gen)
    try:
        TritonExperts().apply(torch.randn(3, 48), torch.zeros(3, 2, dtype=torch.long), torch.rand(3, 2), w13, w2)
    except ValueError as exc:
        return {"raised": "shapes do not agree" in str(exc)}
    return {"raised": False}


CASES = {
    "uniform_ep_slots": _case_uniform,
    "uniform_one_dot_plain_grid": lambda g: _case_uniform(g, ONE_DOT_PLAIN_GRID),
    "uniform_tma": lambda g: _case_uniform(g, TMA_TILES),
    "uniform_tma_sorted_x": lambda g: _case_uniform(g, TMA_SORTED_X),
    "odd_sizes_tma": lambda g: _case_odd_sizes_tma(g, TMA_TILES),
    "odd_sizes_tma_sorted_x": lambda g: _case_odd_sizes_tma(g, TMA_SORTED_X),
    "odd_sizes_tma_one_dot": lambda g: _case_odd_sizes_tma(g, TMA_ONE_DOT),
    "uniform_tma_sorted_y": lambda g: _case_uniform(g, TMA_SORTED_Y),
    "odd_sizes_tma_sorted_y": lambda g: _case_odd_sizes_tma(g, TMA_SORTED_Y),
    "skewed_empty_experts_sorted_y": lambda g: _case_skewed_empty_experts(g, TMA_SORTED_Y),
    "uniform_tma_store_flatten": lambda g: _case_uniform(g, TMA_STORE_FLATTEN),
    "uniform_gluon_flags_fall_back": lambda g: _case_uniform(g, GLUON_FLAGS),
    "odd_sizes_tma_store_flatten": lambda g: _case_odd_sizes_tma(g, TMA_STORE_FLATTEN),
    "half_tiles": lambda g: _case_half_tiles(g, HALF_TILES),
    "half_tiles_tma_one_dot": lambda g: _case_half_tiles(g, HALF_TILES_TMA_ONE_DOT),
    "uniform_half_tiles": lambda g: _case_uniform(g, HALF_TILES),
    "skewed_empty_experts": _case_skewed_empty_experts,
    "no_local_slot": _case_no_local_slot,
    "one_token": _case_one_token,
    "zero_tokens": _case_zero_tokens,
    "odd_sizes_strided_default_config": _case_odd_sizes_strided_default_config,
    "out_of_range_ids_are_not_local": _case_out_of_range_ids_are_not_local,
    "alignment_layout": _case_alignment_layout,
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
    for key in ("all_zero", "shape_ok", "layout_ok", "raised"):
        if key in result:
            assert result[key], f"{case}: {key} is False"


@pytest.mark.timeout(30)
def test_unsupported_reason():
    from omni_ep.layers.fused_moe.experts.triton_experts import TritonExperts

    assert TritonExperts.unsupported_reason(torch.device("cuda"), torch.bfloat16) is None
    assert "bf16, fp16 or fp32" in TritonExperts.unsupported_reason(torch.device("cuda"), torch.int8)
    if os.environ.get("TRITON_INTERPRET") != "1":
        assert "TRITON_INTERPRET=1" in TritonExperts.unsupported_reason(torch.device("cpu"), torch.float32)


def _write_table(path: Path, table: dict):
    path.write_text(json.dumps({"_meta": {"device": "test"}, **{str(m): c for m, c in table.items()}}))


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
@pytest.mark.parametrize("device", ["NVIDIA H100 80GB HBM3", "NVIDIA H200"])
@pytest.mark.parametrize("experts", [64, 32, 16, 8])
def test_shipped_configs_cover_hunyuan_shapes(device, experts):
    path = CONFIG_DIR / config_file_name(experts, 3072, device)
    assert path.exists(), f"missing tuned file {path.name}"
    table = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
    assert min(map(int, table)) <= 64 and max(map(int, table)) >= 16384
    for cfg in table.values():
        assert cfg["BLOCK_M"] in (16, 32, 64, 128)
        for gemm in ("gate_up", "down"):
            assert {"BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages"} <= set(cfg[gemm])


if __name__ == "__main__":
    _run_cases()
