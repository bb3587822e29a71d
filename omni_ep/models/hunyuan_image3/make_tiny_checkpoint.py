"""Write a tiny HunyuanImage-3.0 checkpoint in the released layout, for CPU tests.

    python -m omni_ep.models.hunyuan_image3.make_tiny_checkpoint DIR [--seed 0] [--num-shards 4]
        [--variant {base,instruct,instruct-distil}]

DIR gets config.json (per-layer list fields, ``attention_head_dim``, the ``vae`` block),
generation_config.json, tokenizer files with the template's special tokens, and
model.safetensors.index.json + model-0000k-of-0000n.safetensors with the REAL tensor names and layouts:
qkv rows grouped per KV head, experts' ``gate_and_up_proj`` stored [up; gate], the router ``mlp.gate.wg``,
``vae.decoder.*``, and (small) ``vision_model.*``, ``vision_aligner.*``, ``vae.encoder.*``, ``lm_head``,
``model.ln_f`` that a text-to-image load skips. Every tensor is stored in bf16, as the released file does
(the router too). Values are a deterministic function of the seed and the tensor name.

Tiny sizes: hidden 64, 4 heads of 16 (2 KV heads), 2 layers, 8 experts top-2, expert width 32,
patch_embed_hidden_dim 32, VAE widths (32, 32, 32, 64, 64); about 2 MB.

Variants, as released: "base" (HunyuanImage-3.0); "instruct" (HunyuanImage-3.0-Instruct: config.json with
``cfg_distilled`` / ``use_meanflow`` false, ``model_version``, ``rope_type``; generation_config with the
"instruct" template, 50 steps, guidance 2.5; the tokenizer with the Instruct special tokens); "instruct-distil"
(the same with both flags true, the ``guidance_emb.*`` / ``timestep_r_emb.*`` tensors, 8 steps).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os

import torch
from safetensors.torch import save_file

from omni_ep.logger import configure_logging
from omni_ep.models.hunyuan_image3.configuration import HunyuanImage3Config
from omni_ep.models.hunyuan_image3.tokenization import write_tiny_tokenizer
from omni_ep.models.hunyuan_image3.vae import HunyuanVAEDecoder

TINY_VOCAB_SIZE = 512
VARIANTS = ("base", "instruct", "instruct-distil")


def tiny_config(num_experts: int = 8, top_k: int = 2, num_layers: int = 2, variant: str = "base") -> HunyuanImage3Config:
    """The tiny model's config, with the real file's per-layer lists (and the Instruct fields of ``variant``)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    instruct = {} if variant == "base" else dict(
        cfg_distilled=variant == "instruct-distil", use_meanflow=variant == "instruct-distil",
        model_version="HunyuanImage-3.0-Instruct", rope_type="2d")
    return HunyuanImage3Config(
        **instruct,
        vocab_size=TINY_VOCAB_SIZE,
        hidden_size=64,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        attention_head_dim=16,
        intermediate_size=32,
        moe_intermediate_size=[32] * num_layers,
        num_experts=num_experts,
        moe_topk=[top_k] * num_layers,
        num_shared_expert=[1] * num_layers,
        rope_scaling={"type": "custom", "factor": 1.0},
        max_position_embeddings=2048,
        patch_embed_hidden_dim=32,
        image_base_size=256,
        vae={
            "_class_name": "AutoencoderKLConv3D",
            "block_out_channels": [32, 32, 32, 64, 64],
            "layers_per_block": 2,
            "latent_channels": 32,
            "ffactor_spatial": 16,
            "ffactor_temporal": 4,
            "sample_size": 64,
            "sample_tsize": 4,
        },
    )


def transformer_shapes(config: HunyuanImage3Config) -> dict[str, tuple[int, ...]]:
    """Checkpoint name -> shape of every tensor outside ``vae.*`` (reference section 2)."""
    D, V, E, C, P = (config.hidden_size, config.vocab_size, config.num_experts, config.latent_channels,
                     config.patch_embed_hidden_dim)
    shapes: dict[str, tuple[int, ...]] = {"model.wte.weight": (V, D), "model.ln_f.weight": (D,), "lm_head.weight": (V, D)}
    for i in range(config.num_hidden_layers):
        p, I, Is = f"model.layers.{i}", config.moe_intermediate_size_at(i), config.shared_mlp_intermediate_size_at(i)
        shapes |= {
            f"{p}.input_layernorm.weight": (D,),
            f"{p}.self_attn.qkv_proj.weight": (config.qkv_rows, D),
            f"{p}.self_attn.query_layernorm.weight": (config.attention_head_dim,),
            f"{p}.self_attn.key_layernorm.weight": (config.attention_head_dim,),
            f"{p}.self_attn.o_proj.weight": (D, config.num_attention_heads * config.attention_head_dim),
            f"{p}.post_attention_layernorm.weight": (D,),
            f"{p}.mlp.gate.wg.weight": (E, D),
            f"{p}.mlp.shared_mlp.gate_and_up_proj.weight": (2 * Is, D),
            f"{p}.mlp.shared_mlp.down_proj.weight": (D, Is),
        }
        for j in range(E):
            shapes[f"{p}.mlp.experts.{j}.gate_and_up_proj.weight"] = (2 * I, D)
            shapes[f"{p}.mlp.experts.{j}.down_proj.weight"] = (D, I)
    embedders = ("timestep_emb", "time_embed", "time_embed_2")
    embedders += ("guidance_emb",) * bool(config.cfg_distilled) + ("timestep_r_emb",) * bool(config.use_meanflow)
    for name in embedders:
        shapes |= {f"{name}.mlp.0.weight": (D, 256), f"{name}.mlp.0.bias": (D,),
                   f"{name}.mlp.2.weight": (D, D), f"{name}.mlp.2.bias": (D,)}
    shapes |= {"patch_embed.model.0.weight": (P, C, 3, 3), "patch_embed.model.0.bias": (P,)}
    shapes |= _resblock_shapes("patch_embed.model.1", P, D, D)
    shapes |= _resblock_shapes("final_layer.model.0", D, D, P)
    shapes |= {"final_layer.model.1.0.weight": (P,), "final_layer.model.1.0.bias": (P,),
               "final_layer.model.1.2.weight": (C, P, 3, 3), "final_layer.model.1.2.bias": (C,)}
    # Image-understanding towers and a VAE encoder that text-to-image never reads (a few tensors each).
    shapes |= {
        "vision_model.embeddings.patch_embedding.weight": (32, 3 * 16 * 16),
        "vision_model.encoder.layers.0.self_attn.q_proj.weight": (32, 32),
        "vision_model.post_layernorm.weight": (32,),
        "vision_aligner.linear_1.weight": (D, 32),
        "vision_aligner.linear_2.weight": (D, D),
        "vae.encoder.conv_in.weight": (config.vae.block_out_channels[0], 3, 3, 3, 3),
        "vae.encoder.norm_out.weight": (config.vae.block_out_channels[-1],),
        "vae.encoder.conv_out.weight": (2 * C, config.vae.block_out_channels[-1], 3, 3, 3),
    }
    return shapes


def _resblock_shapes(p: str, c_in: int, emb: int, c_out: int) -> dict[str, tuple[int, ...]]:
    shapes = {
        f"{p}.in_layers.0.weight": (c_in,), f"{p}.in_layers.0.bias": (c_in,),
        f"{p}.in_layers.2.weight": (c_out, c_in, 3, 3), f"{p}.in_layers.2.bias": (c_out,),
        f"{p}.emb_layers.1.weight": (2 * c_out, emb), f"{p}.emb_layers.1.bias": (2 * c_out,),
        f"{p}.out_layers.0.weight": (c_out,), f"{p}.out_layers.0.bias": (c_out,),
        f"{p}.out_layers.3.weight": (c_out, c_out, 3, 3), f"{p}.out_layers.3.bias": (c_out,),
    }
    if c_in != c_out:
        shapes |= {f"{p}.skip_connection.weight": (c_out, c_in, 1, 1), f"{p}.skip_connection.bias": (c_out,)}
    return shapes


def vae_decoder_shapes(config: HunyuanImage3Config) -> dict[str, tuple[int, ...]]:
    decoder = HunyuanVAEDecoder.from_vae_config(config.vae.to_dict())
    return {f"vae.decoder.{k}": tuple(v.shape) for k, v in decoder.state_dict().items()}


def tensor_seed(name: str, seed: int) -> int:
    """The random seed of checkpoint tensor ``name``: a function of (seed, name) alone, so a tensor's values do
    not depend on which other tensors a process draws, or in what order."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")


def is_norm_weight(name: str, shape: tuple[int, ...]) -> bool:
    """RMSNorm / GroupNorm scales (1-D weights of a norm): drawn near 1, not near 0."""
    is_norm = "norm" in name or name.endswith(("in_layers.0.weight", "out_layers.0.weight", "final_layer.model.1.0.weight"))
    return len(shape) == 1 and is_norm and name.endswith("weight")


def tiny_tensor(name: str, shape: tuple[int, ...], seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Deterministic values for one tensor: norms near 1, biases small, weights ~ N(0, 1/fan_in); drawn on
    ``device`` (each device type has its own random stream: CPU draws are the checkpoint's)."""
    generator = torch.Generator(device=device).manual_seed(tensor_seed(name, seed))
    values = torch.randn(shape, generator=generator, device=device)
    if is_norm_weight(name, shape):
        return 1.0 + 0.1 * values
    if len(shape) == 1:
        return 0.05 * values
    fan_in = 1
    for n in shape[1:]:
        fan_in *= n
    return values / fan_in**0.5


def split_into_shards(names: list[str], num_shards: int) -> list[list[str]]:
    """Consecutive groups of names (in order), one per shard, as even as the count allows."""
    if not 1 <= num_shards <= len(names):
        raise ValueError(f"num_shards must be in [1, {len(names)}], got {num_shards}")
    base, extra = divmod(len(names), num_shards)
    groups, start = [], 0
    for k in range(num_shards):
        end = start + base + (k < extra)
        groups.append(names[start:end])
        start = end
    return groups


def write_tiny_checkpoint(
    directory: str | os.PathLike,
    seed: int = 0,
    num_shards: int = 4,
    config: HunyuanImage3Config | None = None,
    corpus: tuple[str, ...] | None = None,
) -> str:
    """Write the tiny checkpoint into ``directory`` (created if needed); returns its path. ``corpus``: the
    sentences the tokenizer's BPE is trained on (default: a few built-in ones)."""
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    config = config or tiny_config()
    instruct = config.model_version is not None or bool(config.cfg_distilled or config.use_meanflow)

    corpus_kw = {} if corpus is None else {"corpus": tuple(corpus)}
    write_tiny_tokenizer(directory, vocab_size=min(TINY_VOCAB_SIZE, config.vocab_size), instruct=instruct, **corpus_kw)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    if len(tokenizer) > config.vocab_size:
        raise ValueError(f"the tiny tokenizer has {len(tokenizer)} tokens but vocab_size is {config.vocab_size}")
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    config.to_json_file(os.path.join(directory, "config.json"))
    generation_config = {
        "bos_token_id": config.bos_token_id,
        "eos_token_id": [config.eos_token_id],
        "pad_token_id": config.pad_token_id,
        "bot_task": "image",
        "diff_infer_steps": 50,
        "diff_guidance_scale": 5.0,
        "flow_shift": 3.0,
        "sequence_template": "pretrain",
        "use_system_prompt": "None",
        "max_length": 12800,
    }
    if instruct:  # the Instruct files: the chat template; Distil runs 8 steps with guidance fed to the model
        generation_config |= {"sequence_template": "instruct", "diff_guidance_scale": 2.5, "drop_think": False,
                              "diff_infer_steps": 8 if config.cfg_distilled else 50}
    with open(os.path.join(directory, "generation_config.json"), "w") as f:
        json.dump(generation_config, f, indent=2)
        f.write("\n")

    shapes = transformer_shapes(config) | vae_decoder_shapes(config)
    names = list(shapes)  # model.*, heads, embedders, image towers, then vae.decoder.*
    weight_map, total_size = {}, 0
    groups = split_into_shards(names, num_shards)
    for k, group in enumerate(groups):
        file = f"model-{k + 1:05d}-of-{num_shards:05d}.safetensors"
        tensors = {n: tiny_tensor(n, shapes[n], seed).to(torch.bfloat16).contiguous() for n in group}
        save_file(tensors, os.path.join(directory, file), metadata={"format": "pt"})
        for n, t in tensors.items():
            weight_map[n] = file
            total_size += t.numel() * t.element_size()
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total_size}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
        f.write("\n")
    return directory


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a tiny HunyuanImage-3.0 checkpoint (released layout).")
    parser.add_argument("directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-shards", type=int, default=4)
    parser.add_argument("--num-experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--variant", default="base", choices=VARIANTS,
                        help="the released checkpoint whose layout to write (default: the base model)")
    args = parser.parse_args(argv)
    logger = configure_logging()  # the omni_ep logger: under ``python -m`` this module's own is "__main__"
    write_tiny_checkpoint(args.directory, args.seed, args.num_shards,
                          tiny_config(args.num_experts, args.top_k, variant=args.variant))
    logger.info("wrote %s", args.directory)


if __name__ == "__main__":
    main()
