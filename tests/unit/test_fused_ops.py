"""The fused ops (omni_ep.layers.fused_ops) against the formulas of the released model, written out here
(the model calls these ops, so it cannot be their reference): RMSNorm (fp32, cast, then the weight), split_qkv +
apply_rotary_emb + the fp32 QK-norms (k and v also written into a KV buffer), softmax over all experts + top-k +
renormalise, the shared MLP's up * silu(gate), the all-to-all dispatch's row copies and the combine's ordered fp32
sum (the last two bit-equal on both paths).

Every case runs twice, each time in a child process (this file run as a script): with TRITON_INTERPRET=1 the
Triton kernels run under the interpreter; without it the ops take their torch path. triton.jit reads
TRITON_INTERPRET when a kernel is defined, and other test modules import triton first, hence the children.
The children poison fresh memory (deterministic mode: torch.empty fills floats with NaN and integers with
INT64_MAX), and every comparison covers whole tensors, so an output element a kernel leaves unwritten fails.

Tolerances, kernels under the interpreter: fp32 max |out - ref| / max |ref| < 1e-6 (what differs: the order of
fp32 sums, and numpy's exp in the router). fp16 (the interpreter rounds fp16 exactly; its bf16 rounding is not RNE, so
bf16 is checked on the GPU by benchmarks/bench_ops.py): at most 1 ulp from the model and under 1% of elements
off; the same inputs pushed through the other rounding order (weight multiply before / after the cast) must be
off on more than 10% of elements, so the check does see the order. The torch path: bit-equal everywhere.
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

REPO = Path(__file__).resolve().parents[2]
EPS = 1e-5

# ----------------------------------------------------------------------------------------------------------
# Child process: the cases. Each returns the path it ran, error measures and exact checks.


def _float_err(out, ref) -> dict:
    """fp32 outputs: relative error of the whole tensor; NaN (an unwritten element) propagates."""
    err = ((out.double() - ref.double()).abs().max() / ref.double().abs().max()).item()
    return {"rel_err": err if err == err else float("inf")}


def _half_err(out, ref, wrong_order) -> dict:
    """fp16 outputs: ulps off the model, fraction of elements off, and the same for the other rounding order."""
    ulps = (out.view(torch.int16).int() - ref.view(torch.int16).int()).abs()
    return {
        "max_ulps": int(ulps.max()) if torch.isfinite(out).all() else 1 << 30,
        "mismatch": (out != ref).float().mean().item(),
        "wrong_order_mismatch": (wrong_order != ref).float().mean().item(),
    }


def _errors(out, ref, wrong_order=None) -> dict:
    if out.dtype != ref.dtype or out.shape != ref.shape:
        return {"exact": {"dtype_and_shape": False}}
    return _float_err(out, ref) if out.dtype == torch.float32 else _half_err(out, ref, wrong_order)


def _model_rms_norm(C, dtype, gen, weight_dtype=None):
    from omni_ep.models.hunyuan_image3.attention import HunyuanImage3RMSNorm

    norm = HunyuanImage3RMSNorm(C, EPS, weight_dtype or dtype)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.5 * torch.randn(C, generator=gen))
    return norm


def _weight_before_cast(norm, h):
    """The other rounding order of the hidden-state norm: weight multiply in fp32, one cast at the end."""
    h32 = h.float()
    return (norm.weight.float() * (h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + EPS))).to(h.dtype)


def _case_rms_norm(gen, shape, dtype, weight_dtype=None, strided=False):
    from omni_ep.layers.fused_ops.backend import runs_triton
    from omni_ep.layers.fused_ops.rms_norm import rms_norm

    C = shape[-1]
    x = torch.randn(*shape[:-1], C + 7 * strided, generator=gen)[..., :C].to(dtype)
    norm = _model_rms_norm(C, dtype, gen, weight_dtype)
    out = rms_norm(x, norm.weight.detach(), EPS)
    ref = _weight_after_cast(norm.weight.detach(), x.float(), dtype)
    return {"triton": runs_triton(x), **_errors(out, ref, _weight_before_cast(norm, x))}


def _case_add_rms_norm(gen, shape, dtype):
    from omni_ep.layers.fused_ops.backend import runs_triton
    from omni_ep.layers.fused_ops.rms_norm import add_rms_norm

    x, residual = (3 * torch.randn(shape, generator=gen).to(dtype) for _ in range(2))
    norm = _model_rms_norm(shape[-1], dtype, gen)
    h, out = add_rms_norm(x, residual, norm.weight.detach(), EPS)
    h_ref = x + residual
    return {
        "triton": runs_triton(x),
        "exact": {"h_equals_x_plus_residual": torch.equal(h, h_ref)},
        **_errors(out, _weight_after_cast(norm.weight.detach(), h_ref.float(), dtype), _weight_before_cast(norm, h_ref)),
    }


def _model_attention(num_kv_heads, group_size, head_dim, dtype, gen):
    from omni_ep.models.hunyuan_image3.attention import HunyuanImage3Attention
    from omni_ep.models.hunyuan_image3.make_tiny_checkpoint import tiny_config
    from tests.unit.hunyuan_reference import ensure_single_process_state

    ensure_single_process_state()
    config = dataclasses.replace(
        tiny_config(),
        hidden_size=32,
        num_attention_heads=num_kv_heads * group_size,
        num_key_value_heads=num_kv_heads,
        attention_head_dim=head_dim,
    )
    attn = HunyuanImage3Attention(config, layer_idx=0, params_dtype=dtype)
    with torch.no_grad():
        for norm in (attn.query_layernorm, attn.key_layernorm):
            norm.weight.copy_(1 + 0.5 * torch.randn(head_dim, generator=gen))
    return attn


def _case_rope_qk_norm(gen, B, S, num_kv_heads, group_size, head_dim, dtype, per_sample_tables=False, prefix=0):
    """The model's forward up to SDPA (split, RoPE in fp32, THEN QK-norm, cast) vs one rope_qk_norm call; with
    ``prefix`` rows, k and v are written into a KV buffer [B, prefix + S, N_kv, D] behind them (a cached step)."""
    from omni_ep.layers.fused_ops.backend import runs_triton
    from omni_ep.layers.fused_ops.rope_qk_norm import rope_qk_norm
    from omni_ep.models.hunyuan_image3.rope import apply_rotary_emb, rope_cos_sin

    attn = _model_attention(num_kv_heads, group_size, head_dim, dtype, gen)
    qkv = 2 * torch.randn(B, S, num_kv_heads * (group_size + 2) * head_dim, generator=gen).to(dtype)
    if per_sample_tables:
        angles = 100 * torch.rand(B, S, head_dim // 2, generator=gen)
        cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    else:
        pos = torch.randint(0, 4 * S, (2, S), generator=gen)
        cos, sin = rope_cos_sin(pos[0], pos[1], head_dim)

    q_model, k_model, v_model = attn.split_qkv(qkv)
    q_rot, k_rot = apply_rotary_emb(q_model, cos, sin), apply_rotary_emb(k_model, cos, sin)
    # The QK-norm of an fp32 input: normalised and weighted in fp32, one cast to the model dtype.
    q_ref = _weight_before_cast(attn.query_layernorm, q_rot).to(dtype)
    k_ref = _weight_before_cast(attn.key_layernorm, k_rot).to(dtype)

    kv_out, buffers = None, None
    if prefix:
        buffers = [torch.full((B, prefix + S, num_kv_heads, head_dim), 7.0, dtype=dtype) for _ in range(2)]
        kv_out = tuple(buf.transpose(1, 2)[:, :, prefix:] for buf in buffers)
    q, k, v = rope_qk_norm(
        qkv, cos, sin, attn.query_layernorm.weight.detach(), attn.key_layernorm.weight.detach(), EPS,
        num_kv_heads, group_size, head_dim, kv_out=kv_out,
    )
    # The other order: cast to the model dtype before the weight multiply, as the hidden-state norm does.
    q_wrong = _weight_after_cast(attn.query_layernorm.weight.detach(), q_rot, dtype)
    k_wrong = _weight_after_cast(attn.key_layernorm.weight.detach(), k_rot, dtype)
    q_err, k_err = _errors(q, q_ref, q_wrong), _errors(k, k_ref, k_wrong)
    return {
        "triton": runs_triton(qkv),
        **{key: max(q_err[key], k_err[key]) for key in q_err if key != "exact"},
        "exact": {
            "q_of_BSND_memory": q.transpose(1, 2).is_contiguous(),
            **({"k_contiguous": k.is_contiguous(),
                "v_is_the_view_of_qkv": torch.equal(v, v_model)
                and v.untyped_storage().data_ptr() == qkv.untyped_storage().data_ptr()} if not prefix else
               {"k_v_written_into_kv_out": k is kv_out[0] and v is kv_out[1] and torch.equal(v, v_model),
                "prefix_rows_untouched": all(bool((buf[:, :prefix] == 7.0).all()) for buf in buffers)}),
            **q_err.get("exact", {}),
            **k_err.get("exact", {}),
        },
    }


def _weight_after_cast(weight, r, dtype):
    return weight * (r * torch.rsqrt(r.pow(2).mean(-1, keepdim=True) + EPS)).to(dtype)


def _select_experts(logits, K, renormalize):
    """HunyuanImage-3.0's routing: softmax over all experts in fp32, top-k, renormalise."""
    weights, ids = torch.topk(torch.softmax(logits.float(), -1), K, dim=-1)
    return (weights / weights.sum(-1, keepdim=True) if renormalize else weights), ids


def _case_router(gen, T, E, K, renormalize=True, ties=False):
    from omni_ep.layers.fused_ops.backend import runs_triton
    from omni_ep.layers.fused_ops.router_topk import router_topk

    if ties:  # small integers: many equal probabilities, also at the k-th place
        logits = torch.randint(-2, 3, (T, E), generator=gen).float()
    else:
        logits = 4 * torch.randn(T, E, generator=gen)
    weights, ids = router_topk(logits, K, renormalize)
    weights_ref, ids_ref = _select_experts(logits, K, renormalize)
    sorted_probs, lowest_id_first = torch.sort(torch.softmax(logits, -1), dim=-1, descending=True, stable=True)
    result = {
        "triton": runs_triton(logits),
        **_float_err(weights, weights_ref),
        "exact": {
            "ids_int64": ids.dtype == torch.int64,
            "ids_lowest_first_among_ties": torch.equal(ids, lowest_id_first[:, :K]),
        },
    }
    if ties:
        result["exact"]["data_has_ties_at_k"] = bool((sorted_probs[:, K - 1] == sorted_probs[:, K]).any())
    else:
        result["exact"]["ids_equal_select_experts"] = torch.equal(ids, ids_ref)
    return result


def _case_gather_sum(gen, M, T, R, H, dtype, strided=False):
    """The all-to-all combine: token t sums rows[t, 0..R-1] of src in fp32, in that order (rows repeat: every
    token a rank did not get points at its dump row), cast once; the kernel does the same additions."""
    from omni_ep.layers.fused_ops import gather_sum
    from omni_ep.layers.fused_ops.backend import runs_triton

    src = (4 * torch.randn(M, H + 5 * strided, generator=gen))[:, :H].to(dtype)
    rows = torch.randint(0, M, (T, R), generator=gen)
    out = gather_sum(src, rows)
    ref = src[rows[:, 0]].float()
    for r in range(1, R):
        ref += src[rows[:, r]].float()
    ref = ref.to(dtype)
    # fp32 inputs: the order of the sum shows in the result (16-bit rows add up exactly in fp32).
    in_another_order = sum(src[rows[:, r]].float() for r in reversed(range(R))) if R > 2 and dtype == F32 else None
    return {
        "triton": runs_triton(src),
        "exact": {
            "bit_equal_to_the_ordered_fp32_sum": out.dtype == dtype and torch.equal(out, ref),
            **({} if in_another_order is None else {"inputs_tell_the_order": not torch.equal(in_another_order, ref)}),
        },
    }


def _case_scatter_rows(gen, T, R, H, dtype, strided=False):
    """The all-to-all dispatch's copies: token t lands in rows[t, 0..R-1] of its rank blocks [R, B, H], compacted,
    or in the block's last (dump) row, where several tokens may land; rows no token names keep their contents."""
    from omni_ep.layers.fused_ops import scatter_rows
    from omni_ep.layers.fused_ops.backend import runs_triton

    src = (4 * torch.randn(T, H + 3 * strided, generator=gen))[:, :H].to(dtype)
    B = T + 1
    wanted = torch.rand(T, R, generator=gen) < 0.6
    slot = torch.cumsum(wanted.long(), dim=0) - 1
    rows = torch.where(wanted, slot, B - 1) + B * torch.arange(R)
    out = scatter_rows(src, rows, torch.full((R * B, H), 7.0, dtype=dtype))
    ref = torch.full((R * B, H), 7.0, dtype=dtype)
    for r in range(R):
        ref[rows[wanted[:, r], r]] = src[wanted[:, r]]
    dumped = [(r, (~wanted[:, r]).nonzero().flatten()) for r in range(R)]
    dump_ok = all(
        (out[r * B + B - 1] == 7.0).all() if not len(tokens) else (out[r * B + B - 1] == src[tokens]).all(1).any()
        for r, tokens in dumped
    )
    real = torch.ones(R * B, dtype=torch.bool)
    real[B - 1 :: B] = False
    return {
        "triton": runs_triton(src),
        "exact": {
            "rows_bit_equal": torch.equal(out[real], ref[real]),
            "dump_row_holds_one_dumped_token": bool(dump_ok),
            "some_token_dumped": any(len(tokens) for _, tokens in dumped),
        },
    }


def _case_swiglu(gen, shape, dtype):
    """The shared MLP's activation on its [up | gate] projection: up * F.silu(gate), two roundings in 16 bits."""
    import torch.nn.functional as F

    from omni_ep.layers.fused_ops import swiglu
    from omni_ep.layers.fused_ops.backend import runs_triton

    up_gate = (3 * torch.randn(*shape, generator=gen)).to(dtype)
    up, gate = up_gate.chunk(2, dim=-1)
    ref = up * F.silu(gate)
    one_rounding = (up.float() * F.silu(gate.float())).to(dtype)  # silu not rounded to 16 bits first
    return {"triton": runs_triton(up_gate), **_errors(swiglu(up_gate), ref, one_rounding)}


def _case_empty(gen):
    from omni_ep.layers.fused_ops import add_rms_norm, rms_norm, router_topk

    x, weight = torch.zeros(0, 48), torch.ones(48)
    shapes = [rms_norm(x, weight, EPS).shape, *(t.shape for t in add_rms_norm(x, x, weight, EPS))]
    shapes += [t.shape for t in router_topk(torch.zeros(0, 8), 2)]
    return {"exact": {"shapes": shapes == [(0, 48)] * 3 + [(0, 2)] * 2}}


F32, F16 = torch.float32, torch.float16
CASES = {
    "rms_norm_fp32_odd_C": lambda g: _case_rms_norm(g, (37, 100), F32),
    "rms_norm_fp32_wide_strided_3d": lambda g: _case_rms_norm(g, (3, 5, 4100), F32, strided=True),
    "rms_norm_fp16": lambda g: _case_rms_norm(g, (23, 96), F16),
    "rms_norm_fp16_x_fp32_weight": lambda g: _case_rms_norm(g, (9, 72), F16, weight_dtype=F32),
    "add_rms_norm_fp32": lambda g: _case_add_rms_norm(g, (2, 19, 100), F32),
    "add_rms_norm_fp16": lambda g: _case_add_rms_norm(g, (41, 80), F16),
    "rope_qk_norm_fp32_D32": lambda g: _case_rope_qk_norm(g, B=2, S=13, num_kv_heads=2, group_size=3, head_dim=32,
                                                          dtype=F32),
    "rope_qk_norm_fp32_D16_per_sample_tables": lambda g: _case_rope_qk_norm(
        g, B=2, S=7, num_kv_heads=1, group_size=4, head_dim=16, dtype=F32, per_sample_tables=True),
    "rope_qk_norm_fp32_D24": lambda g: _case_rope_qk_norm(g, B=1, S=5, num_kv_heads=3, group_size=1, head_dim=24,
                                                          dtype=F32),
    "rope_qk_norm_fp16_D32": lambda g: _case_rope_qk_norm(g, B=1, S=33, num_kv_heads=2, group_size=4, head_dim=32,
                                                          dtype=F16),
    "rope_qk_norm_fp32_D24_into_kv_buffer": lambda g: _case_rope_qk_norm(
        g, B=2, S=9, num_kv_heads=2, group_size=2, head_dim=24, dtype=F32, prefix=5),
    "router_E8_K1": lambda g: _case_router(g, T=29, E=8, K=1),
    "router_E8_K2_not_renormalized": lambda g: _case_router(g, T=29, E=8, K=2, renormalize=False),
    "router_E64_K8": lambda g: _case_router(g, T=37, E=64, K=8),
    "router_E12_K8": lambda g: _case_router(g, T=5, E=12, K=8),
    "router_E256_K16": lambda g: _case_router(g, T=9, E=256, K=16),
    "router_E64_K8_ties": lambda g: _case_router(g, T=33, E=64, K=8, ties=True),
    "router_E8_K2_ties_not_renormalized": lambda g: _case_router(g, T=33, E=8, K=2, renormalize=False, ties=True),
    "gather_sum_fp32_R2": lambda g: _case_gather_sum(g, M=2 * 31, T=29, R=2, H=100, dtype=F32),
    "gather_sum_fp32_R3_wide_strided": lambda g: _case_gather_sum(g, M=3 * 9, T=8, R=3, H=2100, dtype=F32,
                                                                  strided=True),
    "gather_sum_fp32_R8": lambda g: _case_gather_sum(g, M=8 * 5, T=37, R=8, H=64, dtype=F32),
    "gather_sum_fp16_R4": lambda g: _case_gather_sum(g, M=4 * 11, T=10, R=4, H=96, dtype=F16),
    "gather_sum_R1_no_tokens": lambda g: _case_gather_sum(g, M=3, T=0, R=1, H=16, dtype=F32),
    "scatter_rows_fp32_R2": lambda g: _case_scatter_rows(g, T=29, R=2, H=100, dtype=F32),
    "scatter_rows_fp16_R3_wide_strided": lambda g: _case_scatter_rows(g, T=9, R=3, H=2100, dtype=F16, strided=True),
    "swiglu_fp32_3d": lambda g: _case_swiglu(g, (2, 7, 2 * 50), F32),
    "swiglu_fp32_wide": lambda g: _case_swiglu(g, (5, 2 * 1100), F32),
    "swiglu_fp16": lambda g: _case_swiglu(g, (31, 2 * 96), F16),
    "empty_inputs": _case_empty,
}


def _run_cases():
    torch.use_deterministic_algorithms(True)  # torch.empty hands out NaN / INT64_MAX: unwritten outputs show
    for name, case in CASES.items():
        gen = torch.Generator().manual_seed(sum(map(ord, name)))  # fresh inputs per case
        try:
            result = case(gen)
        except Exception as exc:  # reported to the parent test, which fails with the message
            result = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps({"case": name, **result}), flush=True)


# ----------------------------------------------------------------------------------------------------------
# Parent process: the tests.

MODES = ("triton", "torch")


@pytest.fixture(scope="module")
def case_results() -> dict[str, dict[str, dict]]:
    """{mode: {case: result}}; both children run at once."""
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    procs = {}
    for mode in MODES:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["PYTHONPATH"] = path
        if mode == "triton":
            env["TRITON_INTERPRET"] = "1"
        procs[mode] = subprocess.Popen(
            [sys.executable, __file__], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    results = {}
    for mode, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=240)
        assert proc.returncode == 0, stderr[-3000:]
        rows = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
        results[mode] = {row.pop("case"): row for row in rows}
    return results


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("mode", MODES)
def test_fused_op_matches_model(case_results, mode, case):
    result = case_results[mode][case]
    assert "error" not in result, result["error"]
    if "triton" in result:
        assert result["triton"] == (mode == "triton"), f"{case}: the {mode} path did not run"
    for check, ok in result.get("exact", {}).items():
        assert ok, f"{case} ({mode}): {check} is False"
    exact = mode == "torch"
    if "rel_err" in result:
        assert result["rel_err"] <= (0.0 if exact else 1e-6), f"{case} ({mode}): relative error {result['rel_err']:.2e}"
    if "mismatch" in result:
        assert result["max_ulps"] <= (0 if exact else 1), f"{case} ({mode}): {result['max_ulps']} ulps off the model"
        assert result["mismatch"] <= (0.0 if exact else 0.01), f"{case} ({mode}): {result['mismatch']:.1%} off"
        assert result["wrong_order_mismatch"] > 0.1, f"{case}: the inputs do not tell the rounding orders apart"


@pytest.mark.timeout(60)
def test_bad_arguments_raise():
    from omni_ep.layers.fused_ops import (
        add_rms_norm, gather_sum, rms_norm, rope_qk_norm, router_topk, scatter_rows, swiglu,
    )

    x = torch.zeros(3, 8)
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, torch.ones(1), EPS)
    with pytest.raises(ValueError, match="same shape"):
        add_rms_norm(x, torch.zeros(3, 4), torch.ones(8), EPS)
    with pytest.raises(ValueError, match="top_k"):
        router_topk(x, 9)
    qkv, cos, w = torch.zeros(1, 5, 2 * (3 + 2) * 16), torch.zeros(5, 16), torch.ones(16)
    with pytest.raises(ValueError, match="qkv width"):
        rope_qk_norm(qkv, cos, cos, w, w, EPS, num_kv_heads=2, group_size=4, head_dim=16)
    with pytest.raises(ValueError, match="int64 rows"):
        gather_sum(x, torch.zeros(3, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="int64 rows"):
        gather_sum(x, torch.zeros(3, 0, dtype=torch.int64))
    with pytest.raises(ValueError, match="scatter_rows takes"):
        scatter_rows(x, torch.zeros(3, 2, dtype=torch.int64), torch.zeros(4, 8, dtype=torch.float16))
    with pytest.raises(ValueError, match="2I"):
        swiglu(torch.zeros(3, 7))
    with pytest.raises(ValueError, match="cos"):
        rope_qk_norm(qkv, cos[:4], cos[:4], w, w, EPS, num_kv_heads=2, group_size=3, head_dim=16)
    kv = torch.zeros(1, 2, 5, 16)
    with pytest.raises(ValueError, match="kv_out"):
        rope_qk_norm(qkv, cos, cos, w, w, EPS, num_kv_heads=2, group_size=3, head_dim=16, kv_out=(kv, kv[:, :1]))


if __name__ == "__main__":
    _run_cases()
