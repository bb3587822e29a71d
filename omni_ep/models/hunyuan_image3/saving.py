"""Write a HunyuanImage-3.0 transformer (and VAE decoder) back in the released checkpoint layout.

Experts go back to their checkpoint names: w13 [E, 2I, H] ([gate; up]) -> experts.{j}.gate_and_up_proj
stored [up; gate]; w2 [E, H, I] -> experts.{j}.down_proj. Needs the whole model in one process.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file
from torch import nn

from omni_ep.layers.fused_moe import FusedMoE
from omni_ep.models.hunyuan_image3.loading import INDEX_NAME


def check_savable(transformer: nn.Module) -> None:
    """Raise unless every expert is whole in this process and unquantized (the released layout holds bf16 experts)."""
    for name, module in transformer.named_modules():
        if not isinstance(module, FusedMoE):
            continue
        if module.local_num_experts != module.num_experts or module.tp_size > 1:
            raise ValueError(
                "save_pretrained needs every expert whole in one process; this one holds "
                f"{module.local_num_experts}/{module.num_experts} experts at TP {module.tp_size}. Save from a single process"
            )
        if module.quantization is not None:
            raise ValueError(f"{name}: experts quantized to {module.quantization} cannot be written back as the "
                             "released weights; save from a model loaded without quantization")


def checkpoint_tensors(transformer: nn.Module, vae_decoder: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Checkpoint name -> tensor for every weight (experts unfused into the released names)."""
    check_savable(transformer)
    tensors = {}
    experts = {name: m for name, m in transformer.named_modules() if isinstance(m, FusedMoE)}
    for name, module in experts.items():
        I = module.intermediate_size
        for local, expert_id in enumerate(module.local_expert_ids):
            gate, up = module.w13_weight[local].split(I)
            tensors[f"{name}.{expert_id}.gate_and_up_proj.weight"] = torch.cat([up, gate])
            tensors[f"{name}.{expert_id}.down_proj.weight"] = module.w2_weight[local]
    for name, param in transformer.named_parameters():
        if name.rpartition(".")[0] not in experts:
            tensors[name] = param
    if vae_decoder is not None:
        tensors.update({f"vae.decoder.{n}": p for n, p in vae_decoder.state_dict().items()})
    return {n: t.detach().to("cpu").contiguous() for n, t in tensors.items()}


def save_checkpoint(
    transformer: nn.Module,
    vae_decoder: nn.Module | None,
    directory: str | os.PathLike,
    max_shard_bytes: int = 2**30,
    dtype: torch.dtype | None = None,
    extra_tensors: dict[str, torch.Tensor] | None = None,
) -> list[str]:
    """Write the shards and ``model.safetensors.index.json`` into ``directory``; returns the shard names.

    dtype: every floating tensor is stored in it (the released file is bf16 throughout, the router too);
    None keeps each tensor's own. extra_tensors: more checkpoint names to store (e.g. ``vae.encoder.*``).
    """
    tensors = checkpoint_tensors(transformer, vae_decoder)
    tensors |= {n: t.detach().to("cpu").contiguous() for n, t in (extra_tensors or {}).items()}
    if dtype is not None:
        tensors = {n: t.to(dtype) if t.is_floating_point() else t for n, t in tensors.items()}
    shards, current, size = [], {}, 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensors[name]
        size += nbytes
    shards.append(current)
    files, weight_map = [], {}
    for k, shard in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(directory, file), metadata={"format": "pt"})
        files.append(file)
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(os.path.join(directory, INDEX_NAME), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
    return files
