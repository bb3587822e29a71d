"""An independent, straightforward HunyuanImage-3.0 forward for tests, written from the reference page only.

Reads the checkpoint tensors by name and computes everything with plain loops (per head, per token, per
expert); it shares no code with omni_ep. Shape legend: B batch, S tokens, D hidden, h x w latent grid.
"""

from __future__ import annotations

import functools
import json
import math
import os
import tempfile

import torch
import torch.nn.functional as F
from safetensors.torch import load_file


def load_checkpoint_tensors(path: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config dict, every tensor as fp32) of a checkpoint folder."""
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(path, "model.safetensors.index.json")) as f:
        files = set(json.load(f)["weight_map"].values())
    tensors = {}
    for file in sorted(files):
        tensors.update({k: v.float() for k, v in load_file(os.path.join(path, file)).items()})
    return config, tensors


def per_layer(value, i):
    return value if isinstance(value, int) else value[i]


def rms_norm(x, weight, eps):
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def swiglu_up_gate(x, w_gate_and_up, w_down):
    """[up; gate] layout: the activation is on the SECOND half."""
    up, gate = (x @ w_gate_and_up.T).chunk(2, dim=-1)
    return (up * F.silu(gate)) @ w_down.T


def moe_dense(x_TD, W, prefix, config, layer):
    """Per token, per chosen expert; fp32 router: softmax over all experts, top-k, renormalise; + shared."""
    E, k = config["num_experts"], per_layer(config["moe_topk"], layer)
    out = swiglu_up_gate(x_TD, W[f"{prefix}.shared_mlp.gate_and_up_proj.weight"], W[f"{prefix}.shared_mlp.down_proj.weight"])
    probs = torch.softmax(x_TD.double() @ W[f"{prefix}.gate.wg.weight"].double().T, dim=-1)
    for t in range(x_TD.shape[0]):
        order = sorted(range(E), key=lambda e: -probs[t, e].item())[:k]
        total = sum(probs[t, e].item() for e in order)
        for e in order:
            y = swiglu_up_gate(
                x_TD[t], W[f"{prefix}.experts.{e}.gate_and_up_proj.weight"], W[f"{prefix}.experts.{e}.down_proj.weight"]
            )
            out[t] += (probs[t, e].item() / total) * y
    return out


def timestep_embed(t, W, prefix):
    freqs = [math.exp(-math.log(10000.0) * i / 128) for i in range(128)]
    args = torch.tensor([[float(tb) * f for f in freqs] for tb in t])
    sinus = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    h = F.gelu(sinus @ W[f"{prefix}.mlp.0.weight"].T + W[f"{prefix}.mlp.0.bias"])
    return h @ W[f"{prefix}.mlp.2.weight"].T + W[f"{prefix}.mlp.2.bias"]


def resblock(x, emb, W, p):
    def gn(v, name):
        return F.group_norm(v, 32, W[f"{name}.weight"], W[f"{name}.bias"], eps=1e-5)

    h = F.conv2d(F.silu(gn(x, f"{p}.in_layers.0")), W[f"{p}.in_layers.2.weight"], W[f"{p}.in_layers.2.bias"], padding=1)
    scale, shift = (F.silu(emb) @ W[f"{p}.emb_layers.1.weight"].T + W[f"{p}.emb_layers.1.bias"]).chunk(2, dim=-1)
    h = gn(h, f"{p}.out_layers.0") * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
    h = F.conv2d(F.silu(h), W[f"{p}.out_layers.3.weight"], W[f"{p}.out_layers.3.bias"], padding=1)
    skip = x
    if f"{p}.skip_connection.weight" in W:
        skip = F.conv2d(x, W[f"{p}.skip_connection.weight"], W[f"{p}.skip_connection.bias"])
    return skip + h


def positions(seq_len, image_start, h, w):
    ys, xs = list(range(seq_len)), list(range(seq_len))
    for r in range(h):
        for c in range(w):
            s = image_start + r * w + c
            ys[s] = int(image_start + (h * w - h) / 2 + r)
            xs[s] = int(image_start + (h * w - w) / 2 + c)
    return ys, xs


def rope(x_SD, ys, xs, theta):
    """x [S, Dh] for one head -> rotated, 2-D: even frequency index uses y, odd uses x."""
    Dh = x_SD.shape[-1]
    out = torch.empty_like(x_SD)
    for s in range(x_SD.shape[0]):
        ang = [(ys[s] if j % 2 == 0 else xs[s]) * theta ** (-2 * j / Dh) for j in range(Dh // 2)]
        ang = torch.tensor(ang + ang, dtype=torch.float64)
        v = x_SD[s].double()
        rot = torch.cat([-v[Dh // 2 :], v[: Dh // 2]])
        out[s] = (v * torch.cos(ang) + rot * torch.sin(ang)).float()
    return out


def reference_velocity(config, W, input_ids, latents, timestep, image_slice, timestep_index):
    """velocity [B, C, h, w] of the full sequence, as the reference page describes."""
    B, C, h, w = latents.shape
    S = input_ids.shape[1]
    D, nh, nkv, Dh = config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"], config["attention_head_dim"]
    g, eps = nh // nkv, config["rms_norm_eps"]
    x = W["model.wte.weight"][input_ids].clone()
    x[:, timestep_index] = timestep_embed(timestep, W, "timestep_emb")
    emb = timestep_embed(timestep, W, "time_embed")
    p = F.conv2d(latents, W["patch_embed.model.0.weight"], W["patch_embed.model.0.bias"], padding=1)
    x[:, image_slice] = resblock(p, emb, W, "patch_embed.model.1").flatten(2).transpose(1, 2)

    ys, xs = positions(S, image_slice.start, h, w)
    mask = torch.tril(torch.ones(S, S, dtype=torch.bool))
    mask[image_slice, image_slice] = True
    for i in range(config["num_hidden_layers"]):
        L = f"model.layers.{i}"
        a = rms_norm(x, W[f"{L}.input_layernorm.weight"], eps)
        qkv = (a @ W[f"{L}.self_attn.qkv_proj.weight"].T).view(B, S, nkv, g + 2, Dh)
        attn = torch.empty(B, S, nh, Dh)
        for b in range(B):
            for head in range(nh):
                kv = head // g
                q = rope(qkv[b, :, kv, head % g], ys, xs, config["rope_theta"])
                k = rope(qkv[b, :, kv, g], ys, xs, config["rope_theta"])
                q = rms_norm(q, W[f"{L}.self_attn.query_layernorm.weight"], eps)
                k = rms_norm(k, W[f"{L}.self_attn.key_layernorm.weight"], eps)
                scores = (q @ k.T) / math.sqrt(Dh)
                scores = scores.masked_fill(~mask, float("-inf"))
                attn[b, :, head] = torch.softmax(scores, dim=-1) @ qkv[b, :, kv, g + 1]
        x = x + attn.reshape(B, S, nh * Dh) @ W[f"{L}.self_attn.o_proj.weight"].T
        m = rms_norm(x, W[f"{L}.post_attention_layernorm.weight"], eps)
        x = x + moe_dense(m.reshape(B * S, D), W, f"{L}.mlp", config, i).reshape(B, S, D)

    hid = x[:, image_slice].transpose(1, 2).reshape(B, D, h, w)  # no ln_f
    out = resblock(hid, timestep_embed(timestep, W, "time_embed_2"), W, "final_layer.model.0")
    out = F.group_norm(out, 32, W["final_layer.model.1.0.weight"], W["final_layer.model.1.0.bias"], eps=1e-5)
    return F.conv2d(F.silu(out), W["final_layer.model.1.2.weight"], W["final_layer.model.1.2.bias"], padding=1)


def reference_vae_decode(W: dict[str, torch.Tensor], z: torch.Tensor, ffactor_temporal: int) -> torch.Tensor:
    """z [B, C, T, h, w] -> every frame [B, 3, T * ffactor_temporal, h * 2^u, w * 2^u] (u upsampling levels), as
    section 6 says: every conv an F.conv3d over all frames, F.group_norm, the attention written out; W the
    ``vae.decoder.*`` tensors without that prefix (any device and dtype)."""

    def conv(x, name):
        weight = W[f"{name}.weight"]
        return F.conv3d(x, weight, W[f"{name}.bias"], padding=weight.shape[-1] // 2)

    def gn(x, name):
        return F.group_norm(x, 32, W[f"{name}.weight"], W[f"{name}.bias"], eps=1e-6)

    def resnet(x, p):
        h = conv(F.silu(gn(x, f"{p}.norm1")), f"{p}.conv1")
        h = conv(F.silu(gn(h, f"{p}.norm2")), f"{p}.conv2")
        return (conv(x, f"{p}.nin_shortcut") if f"{p}.nin_shortcut.weight" in W else x) + h

    def rearrange(x, r1):  # b (r1 r2 r3 c) f h w -> b c (f r1) (h r2) (w r3)
        b, C, f, h, w = x.shape
        x = x.reshape(b, r1, 2, 2, C // (4 * r1), f, h, w).permute(0, 4, 5, 1, 6, 2, 7, 3)
        return x.reshape(b, -1, f * r1, 2 * h, 2 * w)

    block_in = W["conv_in.weight"].shape[0]
    h = conv(z, "conv_in") + z.repeat_interleave(block_in // z.shape[1], dim=1)
    h = resnet(h, "mid.block_1")
    B, C, T, hh, ww = h.shape
    a = gn(h, "mid.attn_1.norm")
    q, k, v = (conv(a, f"mid.attn_1.{n}").reshape(B, C, -1) for n in ("q", "k", "v"))
    attn = torch.softmax(q.transpose(1, 2) @ k / math.sqrt(C), dim=-1)  # [B, L, L] over all f*h*w positions
    h = h + conv((v @ attn.transpose(1, 2)).reshape(B, C, T, hh, ww), "mid.attn_1.proj_out")
    h = resnet(h, "mid.block_2")
    level = 0
    while f"up.{level}.block.0.conv1.weight" in W:
        block = 0
        while f"up.{level}.block.{block}.conv1.weight" in W:
            h = resnet(h, f"up.{level}.block.{block}")
            block += 1
        if f"up.{level}.upsample.conv.weight" in W:
            r1 = 2 if 2**level < ffactor_temporal else 1
            out = conv(h, f"up.{level}.upsample.conv")
            h = rearrange(out, r1) + rearrange(h.repeat_interleave(out.shape[1] // h.shape[1], dim=1), r1)
        level += 1
    return conv(F.silu(gn(h, "norm_out")), "conv_out")


@functools.cache
def tiny_checkpoint_path() -> str:
    """The tiny checkpoint (seed 0), written once per test process into a temporary folder."""
    from omni_ep.models.hunyuan_image3.make_tiny_checkpoint import write_tiny_checkpoint

    return write_tiny_checkpoint(os.path.join(tempfile.mkdtemp(prefix="hunyuan_tiny_"), "ckpt"), seed=0)


def ensure_single_process_state() -> None:
    """A default (single-process, no parallelism) layout, unless one is already set up."""
    from omni_ep.config import ParallelConfig
    from omni_ep.distributed import get_parallel_config, init_parallel_state, is_parallel_state_initialized

    if not is_parallel_state_initialized():
        init_parallel_state(ParallelConfig())
    if get_parallel_config().world_size != 1:
        raise RuntimeError("these tests need a single-process parallel state")


def tiny_inputs(vocab_size: int, batch: int = 2, prompt_len: int = 5, h: int = 4, w: int = 4, seed: int = 0):
    """(input_ids [B, S], latents [B, 32, h, w], timestep [B], image_slice, timestep_index) in the template's
    layout: <bos> prompt(prompt_len) <boi> <size> <ratio> <timestep> <img> x h*w <eoi>."""
    gen = torch.Generator().manual_seed(seed)
    timestep_index = 1 + prompt_len + 3
    image_slice = slice(timestep_index + 1, timestep_index + 1 + h * w)
    S = image_slice.stop + 1
    input_ids = torch.randint(0, vocab_size, (batch, S), generator=gen)
    latents = torch.randn(batch, 32, h, w, generator=gen)
    timestep = torch.rand(batch, generator=gen) * 1000
    return input_ids, latents, timestep, image_slice, timestep_index
