"""The non-expert element-wise ops of a cached denoising step, eager (the model code) vs torch.compile of the
same function vs the fused Triton kernels of omni_ep.layers.fused_ops; the attention call itself; and the
latent adapters (patch_embed, final_layer) by how their convolutions are called.

    PYTHONPATH=$PWD python benchmarks/bench_ops.py --json benchmarks/results/ops_h200.json
    PYTHONPATH=$PWD python benchmarks/bench_ops.py --sections adapters --json benchmarks/results/adapters_h200.json

Shapes (defaults): one CFG branch of a cached step at 1024x1024: S = 4097 query tokens (<timestep> + 64x64
image), 13 cached text keys (S_kv = 4110), hidden 4096, 32 query / 8 KV heads of 128, bf16; router logits
[4097, 64] fp32, top-8.

Ops: rms_norm, add_rms_norm, rope_qk_norm (from the fused qkv output), router_topk, gather_sum (the all2all
combine at EP 2: [S, H] from two blocks of S + 1 rows), scatter_rows (the all2all dispatch's copies into those
blocks), swiglu (the shared MLP's up * silu(gate) on [S, 2 x 3072]). Each contender is timed with
triton.testing.do_bench (median of CUDA-event times; L2 is flushed before every run) and checked against eager:
max |out - eager| / max |eager| over every output, ulps and the fraction of elements not bit-equal (16-bit
outputs), and for the router the fraction of differing ids. GB/s counts the bytes an ideal kernel moves (inputs
read once, outputs written once).

Attention (cached step, q [1, 32, 4097, 128], k/v [1, 8, 4110, 128]), up to what o_proj reads ([1, S, N x D]):
(a) K/V repeated 4x and SDPA with a dense bool mask (row 0, the <timestep> token, sees only the 13 text keys and
itself); (b) the same result mask-free: SDPA of row 0 on keys[:14] and of rows 1.. on all keys, enable_gqa=True,
no repeat, the two outputs concatenated; (d) the model's call: q in [B, S, N, D] memory, SDPA of all rows on all
keys, row 0 overwritten by its own call (no concatenation, no transposing copy), also pinned to each SDPA
backend (flash, efficient, cudnn). Max |out - (a)| is reported.

Adapters (real widths, 64x64 grid, B = 1 and 2; weights drawn at std 1/sqrt(fan-in)): B samples in one call vs
one call per sample, conv weights and activations contiguous vs channels-last; checked against the first.

A contender that raises is reported as "n/a: <reason>" and the rest go on. Exit code 1 when a Triton kernel
raises or is off eager by more than rounding-order noise (16-bit outputs: over 1 ulp, or over 1% of elements not
bit-equal; fp32: relative error over 1e-5; any differing expert id). --device cpu --no-compile with small
shapes runs the same plumbing on a CPU (the Triton contender then runs under TRITON_INTERPRET=1 if set, else the
ops' torch path; timings there are wall-clock and mean nothing).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile
from triton.testing import do_bench

from omni_ep.config import ParallelConfig
from omni_ep.distributed import destroy_parallel_state, init_parallel_state
from omni_ep.layers.fused_ops import add_rms_norm, gather_sum, rms_norm, rope_qk_norm, router_topk, scatter_rows, swiglu
from omni_ep.layers.fused_ops.backend import runs_triton
from omni_ep.models.hunyuan_image3.attention import HunyuanImage3Attention, HunyuanImage3RMSNorm
from omni_ep.models.hunyuan_image3.configuration import HunyuanImage3Config
from omni_ep.models.hunyuan_image3.embeddings import HunyuanUNetDown, HunyuanUNetUp
from omni_ep.models.hunyuan_image3.rope import apply_rotary_emb, image_rope_positions, rope_cos_sin


def parse_args(argv=None) -> argparse.Namespace:
    intro, rest = __doc__.split("\n\n", 1)
    p = argparse.ArgumentParser(description=intro, epilog=rest, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4097, help="query tokens S (<timestep> + image tokens)")
    p.add_argument("--prefix", type=int, default=13, help="cached text keys before <timestep>")
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--shared-intermediate", type=int, default=3072, help="the shared MLP's intermediate size")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--device", default="cuda")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile contenders")
    p.add_argument("--rep-ms", type=int, default=100, help="do_bench repetition budget per contender")
    p.add_argument("--latent-size", type=int, default=64, help="the adapters' latent grid side (64 at 1024x1024)")
    p.add_argument("--adapter-hidden", type=int, default=1024, help="the adapters' width P (patch_embed_hidden_dim)")
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS), help="what to run")
    p.add_argument("--json", default=None, help="write the results here")
    return p.parse_args(argv)


def short_reason(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines() or [""]
    return f"n/a: {type(exc).__name__}: {lines[0][:160]}"


def timer(device, rep_ms: int) -> Callable[[Callable], float]:
    """fn -> median ms. CUDA: do_bench (events, L2 flushed between runs); CPU: wall clock, for plumbing only."""
    if device.type == "cuda":
        return lambda fn: do_bench(fn, warmup=25, rep=rep_ms, return_mode="median")

    def wall(fn):
        fn()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    return wall


def as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def compare(out, ref) -> dict:
    """Every output tensor against the reference's: float ones by error, integer ones (router ids) by mismatch."""
    row = {"max_abs_err": 0.0, "max_rel_err": 0.0, "not_bit_equal": 0.0}
    for o, r in zip(as_tuple(out), as_tuple(ref), strict=True):
        if o.shape != r.shape:
            raise ValueError(f"shape {tuple(o.shape)} != the reference's {tuple(r.shape)}")
        if not o.is_floating_point():
            row["ids_differ"] = (o != r).float().mean().item()
            continue
        d = (o.double() - r.double()).abs().max().item() if torch.isfinite(o).all() else float("inf")
        row["max_abs_err"] = max(row["max_abs_err"], d)
        row["max_rel_err"] = max(row["max_rel_err"], d / max(r.double().abs().max().item(), 1e-30))
        row["not_bit_equal"] = max(row["not_bit_equal"], (o != r).float().mean().item())
        if o.dtype in (torch.bfloat16, torch.float16):  # adjacent 16-bit floats differ by 1 in their bits
            ulps = (o.view(torch.int16).int() - r.view(torch.int16).int()).abs().max().item()
            row["max_ulps"] = max(row.get("max_ulps", 0), ulps)
    return row


def off_eager(row: dict) -> str | None:
    """Why a fused kernel's result is further from eager than rounding-order noise, or None."""
    if row.get("ids_differ", 0) > 0:
        return f"{row['ids_differ']:.3%} of the expert ids differ"
    if "max_ulps" in row and (row["max_ulps"] > 1 or row["not_bit_equal"] > 0.01):
        return f"{row['max_ulps']} ulps, {row['not_bit_equal']:.3%} of elements not bit-equal"
    if "max_ulps" not in row and row["max_rel_err"] > 1e-5:
        return f"relative error {row['max_rel_err']:.2e}"
    return None


def run_contenders(op: str, contenders: dict, inputs: tuple, bench, nbytes=None, flops=None) -> list[dict]:
    """Time each contender on inputs and check it against the first one (the model's code)."""
    rows, ref = [], None
    for name, fn in contenders.items():
        row = {"op": op, "contender": name}
        try:
            out = fn(*inputs)
            if ref is None:
                ref = out
            row.update(compare(out, ref))
            row["ms"] = bench(lambda: fn(*inputs))
            if nbytes:
                row["gb_per_s"] = nbytes / row["ms"] / 1e6
            if flops:
                row["tflops"] = flops / row["ms"] / 1e9
            row["status"] = "ok"
        except Exception as exc:  # one contender failing must not stop the others
            row["status"] = short_reason(exc)
        rows.append(row)
    return rows


def op_benchmarks(a, device, dtype, bench) -> list[dict]:
    S, H, N, N_kv, D, eps = a.tokens, a.hidden, a.heads, a.kv_heads, a.head_dim, 1e-5
    G = N // N_kv
    gen = torch.Generator(device).manual_seed(0)
    size = dtype.itemsize

    norm = HunyuanImage3RMSNorm(H, eps, dtype).to(device)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.2, generator=gen)
    weight = norm.weight.detach()
    x = torch.randn(S, H, device=device, dtype=dtype, generator=gen)
    residual = torch.randn(S, H, device=device, dtype=dtype, generator=gen)

    init_parallel_state(ParallelConfig())
    config = dataclasses.replace(HunyuanImage3Config(), hidden_size=H, num_attention_heads=N, num_key_value_heads=N_kv,
                                 attention_head_dim=D, rms_norm_eps=eps)
    attn = HunyuanImage3Attention(config, layer_idx=0, params_dtype=dtype)  # its projections stay on the CPU
    destroy_parallel_state()
    for layer_norm in (attn.query_layernorm, attn.key_layernorm):
        layer_norm.to(device)
        with torch.no_grad():
            layer_norm.weight.normal_(1.0, 0.2, generator=gen)
    qkv = torch.randn(1, S, N_kv * (G + 2) * D, device=device, dtype=dtype, generator=gen)
    side = max(1, round((S - 1) ** 0.5))  # the image block: <timestep> then side x side tokens (as at 1024x1024)
    pos_y, pos_x = image_rope_positions(a.prefix + S, a.prefix + 1, side, (S - 1) // side, device=device)
    cos, sin = rope_cos_sin(pos_y[a.prefix:], pos_x[a.prefix:], D)
    logits = torch.randn(S, a.experts, device=device, generator=gen) * 2

    # Eager: the model's code before the fused ops (the model now calls them), written out.
    def eager_norm(x, w):
        x32 = x.float()
        return w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)

    def eager_rms_norm(x):
        return eager_norm(x, weight)

    def eager_add_rms_norm(x, residual):
        h = x + residual
        return h, eager_norm(h, weight)

    def eager_rope_qk_norm(qkv, cos, sin):  # HunyuanImage3Attention.forward up to the KV cache
        q, k, v = attn.split_qkv(qkv)
        q = eager_norm(apply_rotary_emb(q, cos, sin), attn.query_layernorm.weight).to(dtype)
        k = eager_norm(apply_rotary_emb(k, cos, sin), attn.key_layernorm.weight).to(dtype)
        return q, k, v

    def eager_router(logits):
        probs = torch.softmax(logits.float(), dim=-1)
        w, ids = torch.topk(probs, a.top_k, dim=-1)
        return w / w.sum(dim=-1, keepdim=True), ids

    # The all2all combine at EP 2: rows [S, 2] into blocks of S + 1 rows (a dump row each), token t at slot t.
    R, B = 2, S + 1
    partial = torch.randn(R * B, H, device=device, dtype=dtype, generator=gen)
    rows = torch.arange(S, device=device)[:, None] + B * torch.arange(R, device=device)[None, :]

    def eager_gather_sum(partial, rows):
        out = partial[rows[:, 0]].float()
        for r in range(1, R):
            out += partial[rows[:, r]]
        return out.to(partial.dtype)

    # The all2all dispatch's copies at EP 2: token t into row t of both blocks (into a fresh buffer each call; the
    # dump rows, which no token names here, are left out of the comparison).
    def eager_scatter_rows(x, rows):
        out = x.new_empty(R * B, H)
        for r in range(R):
            out.index_copy_(0, rows[:, r], x)
        return out.view(R, B, H)[:, :S]

    # The shared MLP's activation on its [up | gate] projection, [S, 2 I].
    up_gate = torch.randn(S, 2 * a.shared_intermediate, device=device, dtype=dtype, generator=gen)

    def eager_swiglu(up_gate):
        up, gate = up_gate.chunk(2, dim=-1)
        return up * F.silu(gate)

    cases = [
        ("rms_norm", eager_rms_norm, lambda x: rms_norm(x, weight, eps), (x,), 2 * S * H * size),
        ("add_rms_norm", eager_add_rms_norm, lambda x, r: add_rms_norm(x, r, weight, eps), (x, residual),
         4 * S * H * size),
        ("rope_qk_norm", eager_rope_qk_norm,
         lambda qkv, cos, sin: rope_qk_norm(qkv, cos, sin, attn.query_layernorm.weight.detach(),
                                            attn.key_layernorm.weight.detach(), eps, N_kv, G, D),
         (qkv, cos, sin), 2 * (N + N_kv) * S * D * size + 2 * S * D * 4),
        ("router_topk", eager_router, lambda logits: router_topk(logits, a.top_k, True), (logits,),
         S * a.experts * 4 + S * a.top_k * (4 + 8)),
        ("gather_sum", eager_gather_sum, gather_sum, (partial, rows), (R + 1) * S * H * size + S * R * 8),
        ("scatter_rows", eager_scatter_rows,
         lambda x, rows: scatter_rows(x, rows, x.new_empty(R * B, H)).view(R, B, H)[:, :S], (x, rows),
         (R + 1) * S * H * size + S * R * 8),
        ("swiglu", eager_swiglu, swiglu, (up_gate,), 3 * S * a.shared_intermediate * size),
    ]
    fused_name = "triton" if runs_triton(x) else "fused_ops torch path"
    rows = []
    for op, eager, fused, inputs, nbytes in cases:
        contenders = {"eager": eager}
        if not a.no_compile:
            contenders["compile"] = torch.compile(eager, fullgraph=True)
        contenders[fused_name] = fused
        rows += run_contenders(op, contenders, inputs, bench, nbytes=nbytes)
    return rows


def attention_benchmarks(a, device, dtype, bench) -> list[dict]:
    S, S_kv, N, N_kv, D, G = a.tokens, a.prefix + a.tokens, a.heads, a.kv_heads, a.head_dim, a.heads // a.kv_heads
    seen_by_timestep = a.prefix + 1  # the text keys and <timestep> itself
    gen = torch.Generator(device).manual_seed(1)
    q = torch.randn(1, N, S, D, device=device, dtype=dtype, generator=gen)  # [B, N, S, D] memory
    q_bsnd = q.transpose(1, 2).contiguous().transpose(1, 2)  # the same values in [B, S, N, D] memory
    k, v = (torch.randn(1, N_kv, S_kv, D, device=device, dtype=dtype, generator=gen) for _ in range(2))
    mask = torch.ones(S, S_kv, dtype=torch.bool, device=device)
    mask[0, seen_by_timestep:] = False

    # Each returns what o_proj reads: [1, S, N * D].
    def dense_mask_repeat_kv(q, q_bsnd, k, v):
        out = F.scaled_dot_product_attention(
            q, k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1), attn_mask=mask
        )
        return out.transpose(1, 2).reshape(1, S, N * D)

    def two_calls_gqa(q, q_bsnd, k, v):
        first = F.scaled_dot_product_attention(
            q[:, :, :1], k[:, :, :seen_by_timestep], v[:, :, :seen_by_timestep], enable_gqa=True
        )
        rest = F.scaled_dot_product_attention(q[:, :, 1:], k, v, enable_gqa=True)
        return torch.cat([first.transpose(1, 2), rest.transpose(1, 2)], dim=1).reshape(1, S, N * D)

    def widest_over_all_rows(q, q_bsnd, k, v):  # the model's call: q of [B, S, N, D] memory, row 0 overwritten
        out = F.scaled_dot_product_attention(q_bsnd, k, v, enable_gqa=True)
        out[:, :, :1] = F.scaled_dot_product_attention(
            q_bsnd[:, :, :1], k[:, :, :seen_by_timestep], v[:, :, :seen_by_timestep], enable_gqa=True
        )
        return out.transpose(1, 2).reshape(1, S, N * D)

    def pinned(backend, fn):
        def pinned_fn(*inputs):
            with sdpa_kernel([backend]):
                return fn(*inputs)

        return pinned_fn

    contenders = {
        "a_dense_mask_repeat_kv": dense_mask_repeat_kv,
        "b_two_calls_gqa_cat": two_calls_gqa,
        "d_widest_over_all_rows": widest_over_all_rows,
        "d_widest_over_all_rows_flash": pinned(SDPBackend.FLASH_ATTENTION, widest_over_all_rows),
        "d_widest_over_all_rows_efficient": pinned(SDPBackend.EFFICIENT_ATTENTION, widest_over_all_rows),
        "d_widest_over_all_rows_cudnn": pinned(SDPBackend.CUDNN_ATTENTION, widest_over_all_rows),
    }
    flops = 4 * N * S * S_kv * D  # QK^T and PV
    rows = run_contenders("attention", contenders, (q, q_bsnd, k, v), bench, flops=flops)
    if device.type == "cuda":
        for row in rows:
            if row["status"] == "ok":
                row["kernels"] = attention_kernels(contenders[row["contender"]], (q, q_bsnd, k, v))
    return rows


def adapter_benchmarks(a, device, dtype, bench) -> list[dict]:
    """patch_embed (latents [B, 32, h, w] -> tokens [B, h*w, H]) and final_layer (back), whose 3x3 convolutions
    at H = 4096 are about 2 TFLOP per sample: B samples in one call or one call per sample, with the conv weights
    and activations contiguous or channels-last (the tokens [B, h*w, H] are [B, h, w, H] in memory already). The
    model on CUDA: patch_embed channels-last per sample, final_layer channels-last in one call."""
    C, P, H, side = 32, a.adapter_hidden, a.hidden, a.latent_size
    gen = torch.Generator(device).manual_seed(2)
    with torch.device(device):
        down, up = HunyuanUNetDown(C, H, P, H).to(dtype), HunyuanUNetUp(H, H, P, C).to(dtype)
    for module in (down, up):
        for param in module.parameters():  # std 1 / sqrt(fan-in): activations stay O(1) through the convs
            param.data.normal_(0, param[0].numel() ** -0.5 if param.dim() > 1 else 0.1, generator=gen)
    down_cl, up_cl = (copy.deepcopy(m).to(memory_format=torch.channels_last) for m in (down, up))

    def tokens(module, channels_last):  # B samples in one call, written out (the module runs one per call)
        def call(latents, emb):
            if channels_last:
                latents = latents.contiguous(memory_format=torch.channels_last)
            return module.model[1](module.model[0](latents), emb).flatten(2).transpose(1, 2)

        return call

    def velocity(module):
        return lambda hidden, emb: module(hidden, emb, side, side)

    def per_sample(fn):
        return lambda x, emb: torch.cat([fn(x[i : i + 1], emb[i : i + 1]) for i in range(x.shape[0])])

    per_pixel = {"patch_embed": 9 * (C * P + P * H + H * H) + P * H, "final_layer": 9 * (H * P + P * P + P * C) + H * P}
    rows = []
    for B in (1, 2):
        latents = torch.randn(B, C, side, side, device=device, dtype=dtype, generator=gen)
        hidden = torch.randn(B, side * side, H, device=device, dtype=dtype, generator=gen)
        emb = torch.randn(B, H, device=device, dtype=dtype, generator=gen)
        patch_embed = {"batch": tokens(down, False), "per sample": per_sample(tokens(down, False)),
                       "channels_last batch": tokens(down_cl, True),
                       "channels_last per sample": per_sample(tokens(down_cl, True))}
        final_layer = {"batch": velocity(up), "per sample": per_sample(velocity(up)),
                       "channels_last batch": velocity(up_cl), "channels_last per sample": per_sample(velocity(up_cl))}
        rows += run_contenders(f"patch_embed B={B}", patch_embed, (latents, emb), bench,
                               flops=2 * B * side * side * per_pixel["patch_embed"])
        rows += run_contenders(f"final_layer B={B}", final_layer, (hidden, emb), bench,
                               flops=2 * B * side * side * per_pixel["final_layer"])
    return rows


def attention_kernels(fn, inputs) -> str:
    """The attention kernels fn launches, by name: which SDPA backend ran."""
    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn(*inputs)
            torch.cuda.synchronize()
        names = {e.key for e in prof.key_averages()}
    except Exception as exc:
        return short_reason(exc)
    words = ("flash", "fmha", "cudnn", "attention", "attn", "sdpa")
    return "; ".join(sorted(n[:80] for n in names if any(w in n.lower() for w in words))) or "none matched"


def print_table(rows: list[dict], columns: list[tuple[str, str]]) -> None:
    """columns: (key, format); a failed contender prints its reason after its name."""
    print(f"{'op':14s} {'contender':26s} " + " ".join(f"{key:>13s}" for key, _ in columns))
    for row in rows:
        line = f"{row['op']:14s} {row['contender']:26s} "
        if row["status"] != "ok":
            print(line + row["status"])
            continue
        print(line + " ".join(f"{format(row[key], fmt) if key in row else '':>13s}" for key, fmt in columns))


SECTIONS = {"ops": op_benchmarks, "attention": attention_benchmarks, "adapters": adapter_benchmarks}


def main(argv=None) -> int:
    a = parse_args(argv)
    device, dtype = torch.device(a.device), getattr(torch, a.dtype)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run on a GPU, or with --device cpu --no-compile and small shapes", file=sys.stderr)
        return 2
    bench = timer(device, a.rep_ms)
    t0 = time.time()
    torch.set_grad_enabled(False)
    results = {name: SECTIONS[name](a, device, dtype, bench) if name in a.sections else [] for name in SECTIONS}
    ops, attention, adapters = results["ops"], results["attention"], results["adapters"]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{name} | torch {torch.__version__} | triton {triton.__version__} | S={a.tokens} H={a.hidden} "
          f"heads {a.heads}/{a.kv_heads}x{a.head_dim} {a.dtype}, router [{a.tokens}, {a.experts}] top-{a.top_k}")
    if ops:
        print("\nelement-wise ops, checked against eager (the model code)")
        print_table(ops, [("ms", ".4f"), ("gb_per_s", ".0f"), ("max_rel_err", ".2e"), ("max_ulps", "d"),
                          ("not_bit_equal", ".3%"), ("ids_differ", ".3%")])
    if attention:
        print("\nattention at the cached step, checked against (a)")
        print_table(attention, [("ms", ".4f"), ("tflops", ".0f"), ("max_abs_err", ".2e")])
    for row in attention:
        if "kernels" in row:
            print(f"  {row['contender']}: {row['kernels']}")
    if adapters:
        print(f"\nadapters at a {a.latent_size}x{a.latent_size} latent grid, checked against one contiguous call")
        print_table(adapters, [("ms", ".4f"), ("tflops", ".0f"), ("max_rel_err", ".2e"), ("not_bit_equal", ".3%")])
    failures = [f"{r['op']}: {r['status'] if r['status'] != 'ok' else off_eager(r)}" for r in ops
                if r["contender"] == "triton" and (r["status"] != "ok" or off_eager(r))]
    for failure in failures:
        print(f"FAIL triton {failure}")
    print(f"\nwall time {time.time() - t0:.1f} s")
    if a.json:
        meta = dict(date=datetime.date.today().isoformat(), device=name, torch=torch.__version__,
                    triton=triton.__version__, args=vars(a), command=" ".join(["python", *sys.argv]))
        with open(a.json, "w") as f:
            json.dump(dict(meta=meta, ops=ops, attention=attention, adapters=adapters, failures=failures), f, indent=2)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
