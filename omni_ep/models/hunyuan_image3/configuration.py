"""The configuration of HunyuanImage-3.0, read from the released ``config.json``.

The real file stores several MoE fields as per-layer LISTS (``moe_topk: [8]*32``,
``moe_intermediate_size: [3072]*32``, ``num_shared_expert: [1]*32``); the ``*_at(layer_idx)`` accessors
accept an int or a list. The head size is ``attention_head_dim`` (not ``head_dim``); the VAE settings live
in the ``vae`` block.

The Instruct checkpoints add ``cfg_distilled`` and ``use_meanflow`` (both true in Instruct-Distil, false in
Instruct), ``model_version`` and ``rope_type``; the base file has none of them. Absent fields stay None, so a
base config.json round-trips unchanged (None reads as false / "2d").
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from typing import Any

PerLayer = int | list[int]

# Fields of the released config.json that text-to-image does not read; kept so a round trip is lossless.
_PASSTHROUGH = "extra"
# Fields only the Instruct files carry: not written while None (absent), so the base layout stays as it was.
_WRITTEN_WHEN_SET = ("cfg_distilled", "use_meanflow", "model_version", "rope_type")


@dataclass
class HunyuanImage3VAEConfig:
    """The ``vae`` block of config.json (an ``AutoencoderKLConv3D``)."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 32
    block_out_channels: list[int] = field(default_factory=lambda: [128, 256, 512, 1024, 1024])
    layers_per_block: int = 2
    ffactor_spatial: int = 16
    ffactor_temporal: int = 4
    scaling_factor: float = 0.562679178327931
    shift_factor: float | None = None
    downsample_match_channel: bool = True
    upsample_match_channel: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HunyuanImage3VAEConfig:
        return _from_dict(cls, d)

    def to_dict(self) -> dict[str, Any]:
        return _to_dict(self)


@dataclass
class HunyuanImage3Config:
    """Model hyper-parameters; defaults are the released base model (D 4096, 32 layers, 64 experts, top-8)."""

    vocab_size: int = 133120
    hidden_size: int = 4096
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    attention_head_dim: int = 128
    intermediate_size: int = 3072
    moe_intermediate_size: PerLayer = 3072
    num_experts: int = 64
    moe_topk: PerLayer = 8
    num_shared_expert: PerLayer = 1
    use_mixed_mlp_moe: bool = True
    norm_topk_prob: bool = True
    moe_drop_tokens: bool = False
    use_qk_norm: bool = True
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 22800
    rms_norm_eps: float = 1e-5
    hidden_act: str = "silu"
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    img_proj_type: str = "unet"
    patch_size: int = 1
    patch_embed_hidden_dim: int = 1024
    image_base_size: int = 1024
    vae_downsample_factor: list[int] = field(default_factory=lambda: [16, 16])
    bos_token_id: int | None = 127958
    eos_token_id: int | None = 127957
    pad_token_id: int | None = 128009
    model_type: str = "hunyuan_image_3_moe"
    architectures: list[str] = field(default_factory=lambda: ["HunyuanImage3ForCausalMM"])
    vae: HunyuanImage3VAEConfig = field(default_factory=HunyuanImage3VAEConfig)
    # Instruct / Instruct-Distil (None: absent, as in the base file)
    cfg_distilled: bool | None = None  # guidance_emb and a <guidance> slot; one row per prompt, no CFG batch
    use_meanflow: bool | None = None  # timestep_r_emb and a <timestep_r> slot: the model also sees the next time r
    model_version: str | None = None  # "HunyuanImage-3.0-Instruct" in the Instruct files
    rope_type: str | None = None  # "2d" (the base 2-D RoPE) is the only one implemented
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if isinstance(self.vae, dict):
            self.vae = HunyuanImage3VAEConfig.from_dict(self.vae)
        self.validate()

    # ---- per-layer fields -------------------------------------------------------------------------
    def _at(self, name: str, layer_idx: int) -> int:
        value = getattr(self, name)
        if isinstance(value, int):
            return value
        if not 0 <= layer_idx < len(value):
            raise IndexError(f"config.{name} has {len(value)} entries; layer {layer_idx} has none")
        return int(value[layer_idx])

    def moe_topk_at(self, layer_idx: int) -> int:
        return self._at("moe_topk", layer_idx)

    def moe_intermediate_size_at(self, layer_idx: int) -> int:
        return self._at("moe_intermediate_size", layer_idx)

    def num_shared_expert_at(self, layer_idx: int) -> int:
        return self._at("num_shared_expert", layer_idx)

    def shared_mlp_intermediate_size_at(self, layer_idx: int) -> int:
        """Width of the always-on shared MLP: the expert width times ``num_shared_expert``."""
        return self.moe_intermediate_size_at(layer_idx) * self.num_shared_expert_at(layer_idx)

    @property
    def latent_channels(self) -> int:
        return self.vae.latent_channels

    @property
    def meta_slots(self) -> tuple[str, ...]:
        """The timestep-like slots of the image block, in sequence order right before the image tokens:
        <timestep> [<guidance>] [<timestep_r>]."""
        return ("timestep",) + ("guidance",) * bool(self.cfg_distilled) + ("timestep_r",) * bool(self.use_meanflow)

    @property
    def qkv_rows(self) -> int:
        """Rows of ``qkv_proj``: (heads + 2 * kv heads) * head dim, grouped per KV head."""
        return (self.num_attention_heads + 2 * self.num_key_value_heads) * self.attention_head_dim

    # ---- checks -----------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ValueError naming the field to change when the config cannot describe this model."""
        for name in ("moe_topk", "moe_intermediate_size", "num_shared_expert"):
            value = getattr(self, name)
            if isinstance(value, list) and len(value) != self.num_hidden_layers:
                raise ValueError(
                    f"config.{name} is a per-layer list of {len(value)} entries but num_hidden_layers is "
                    f"{self.num_hidden_layers}; give one entry per layer or a single int"
                )
            elif not isinstance(value, (int, list)):
                raise ValueError(f"config.{name} must be an int or a per-layer list, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of num_key_value_heads "
                f"({self.num_key_value_heads}) for grouped-query attention"
            )
        if self.attention_head_dim % 4:
            raise ValueError(
                f"attention_head_dim ({self.attention_head_dim}) must be divisible by 4 for the 2-D RoPE"
            )
        if self.hidden_act != "silu":
            raise ValueError(f"only hidden_act='silu' (SwiGLU) is implemented, got {self.hidden_act!r}")
        if self.img_proj_type != "unet" or self.patch_size != 1:
            raise ValueError(
                f"only img_proj_type='unet' with patch_size=1 is implemented, got {self.img_proj_type!r} / "
                f"{self.patch_size}"
            )
        if self.rope_type not in (None, "2d"):
            raise ValueError(f"only rope_type='2d' (the 2-D RoPE of every release) is implemented, got {self.rope_type!r}")
        if not self.use_mixed_mlp_moe:
            raise ValueError("use_mixed_mlp_moe=false (no shared expert) is not implemented")
        if self.moe_drop_tokens:
            raise ValueError("moe_drop_tokens=true is not implemented: HunyuanImage-3.0 never drops tokens")
        for layer_idx in range(self.num_hidden_layers):
            topk = self.moe_topk_at(layer_idx)
            if not 1 <= topk <= self.num_experts:
                raise ValueError(f"moe_topk of layer {layer_idx} is {topk}; it must lie in [1, {self.num_experts}]")
        for c in (self.patch_embed_hidden_dim, self.hidden_size):
            if c % 32:
                raise ValueError(
                    f"patch_embed_hidden_dim ({self.patch_embed_hidden_dim}) and hidden_size "
                    f"({self.hidden_size}) must be multiples of 32 (GroupNorm(32, C) in patch_embed/final_layer)"
                )

    # ---- (de)serialisation ------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HunyuanImage3Config:
        return _from_dict(cls, d)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> HunyuanImage3Config:
        try:
            with open(path) as f:
                d = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"no config.json at {path}: is this a HunyuanImage-3.0 checkpoint folder?") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        return cls.from_dict(d)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> HunyuanImage3Config:
        """Read ``<path>/config.json`` (or ``path`` itself when it is a file)."""
        path = os.fspath(path)
        return cls.from_json_file(os.path.join(path, "config.json") if os.path.isdir(path) else path)

    def to_dict(self) -> dict[str, Any]:
        return _to_dict(self)

    def to_json_file(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")


def _from_dict(cls, d: dict[str, Any]):
    known = {f.name for f in fields(cls)} - {_PASSTHROUGH}
    kwargs = {k: v for k, v in d.items() if k in known}
    extra = {k: v for k, v in d.items() if k not in known}
    return cls(**kwargs, extra=extra)


def _to_dict(obj) -> dict[str, Any]:
    d = {f.name: getattr(obj, f.name) for f in fields(obj) if f.name != _PASSTHROUGH}
    d = {k: v for k, v in d.items() if not (k in _WRITTEN_WHEN_SET and v is None)}
    d = {k: v.to_dict() if hasattr(v, "to_dict") else v for k, v in d.items()}
    return {**getattr(obj, _PASSTHROUGH), **d}
