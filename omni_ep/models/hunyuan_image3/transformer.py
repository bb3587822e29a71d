"""The HunyuanImage-3.0 transformer, as a text-to-image denoiser: latents + timestep -> velocity.

Shape legend: B batch (cond and uncond rows for CFG), S tokens this pass runs, S_kv = S plus the cached
text prefix, H hidden size (4096), C latent channels (32), h x w latent grid, D head dim.

The sequence (template "pretrain"):
    <bos> prompt <boi> <img_size_1024> <img_ratio_k> <timestep> <img> x (h*w) <eoi>
Embeddings are ``wte(input_ids)`` with the ``<timestep>`` slot replaced by ``timestep_emb(t)`` and the image
slots by ``patch_embed(latents, time_embed(t))``. After the decoder layers the hidden states at the image
slots go, WITHOUT ``ln_f``, through ``final_layer(., time_embed_2(t))``.

Text-prefix KV cache: the prefix is every token before ``<timestep>``. Step 0 runs the whole sequence and
stores the prefix K/V; later steps run only ``<timestep>`` and the image tokens. Tokens after the image
(``<eoi>``) are dropped there: under the mask no image token attends to a later token.

Placement of every weight (``PLACEMENT``): "column"/"row" are TP-sharded (contiguous row / column chunks),
"expert" tensors live only on the EP rank that owns the expert (TP-sharded in I when EP is off),
"replicated" is held whole by every rank.
"""

from __future__ import annotations

import torch
from torch import nn

from omni_ep.layers.fused_ops import add_rms_norm
from omni_ep.models.hunyuan_image3.attention import (
    HunyuanImage3Attention,
    HunyuanImage3KVCache,
    HunyuanImage3RMSNorm,
)
from omni_ep.models.hunyuan_image3.attention_mask import attention_segments
from omni_ep.models.hunyuan_image3.configuration import HunyuanImage3Config
from omni_ep.models.hunyuan_image3.embeddings import HunyuanTimestepEmbedder, HunyuanUNetDown, HunyuanUNetUp
from omni_ep.models.hunyuan_image3.moe import HunyuanImage3MoE
from omni_ep.models.hunyuan_image3.rope import image_rope_positions, rope_cos_sin

# Checkpoint name pattern -> how it is split over ranks. Anything not listed is replicated.
PLACEMENT = {
    "model.layers.*.self_attn.qkv_proj.weight": "column (whole KV-head groups per TP rank)",
    "model.layers.*.self_attn.o_proj.weight": "row (input columns; all-reduce over TP)",
    "model.layers.*.mlp.experts.*.gate_and_up_proj.weight": "expert (owner EP rank; [up; gate] -> w13 [gate; up])",
    "model.layers.*.mlp.experts.*.down_proj.weight": "expert (owner EP rank) -> w2",
    "model.layers.*.mlp.gate.wg.weight": "replicated, fp32",
    "model.layers.*.mlp.shared_mlp.*": "replicated weights; each TP rank runs its 1/TP chunk of the tokens",
    "model.wte.weight": "replicated",
    "timestep_emb.* / time_embed.* / time_embed_2.* / patch_embed.* / final_layer.*": "replicated",
}

# Checkpoint tensors a text-to-image run never reads.
SKIPPED_PREFIXES = ("vision_model.", "vision_aligner.", "vae.", "lm_head.", "model.ln_f.")


class HunyuanImage3DecoderLayer(nn.Module):
    """Pre-norm block: h = x + Attn(RMSNorm(x)); y = h + MoE(RMSNorm(h)). [B, S, H] -> [B, S, H]."""

    def __init__(
        self, config: HunyuanImage3Config, layer_idx: int, params_dtype: torch.dtype | None = None, prefix: str = ""
    ):
        super().__init__()
        H, eps = config.hidden_size, config.rms_norm_eps
        self.eps = eps
        self.input_layernorm = HunyuanImage3RMSNorm(H, eps, params_dtype)
        self.self_attn = HunyuanImage3Attention(config, layer_idx, params_dtype, prefix=f"{prefix}.self_attn")
        self.post_attention_layernorm = HunyuanImage3RMSNorm(H, eps, params_dtype)
        self.mlp = HunyuanImage3MoE(config, layer_idx, params_dtype, prefix=f"{prefix}.mlp")

    def forward(self, x_BSH, residual_BSH, cos, sin, segments, kv_cache=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, residual) -> (MoE output, residual): the layer's output is their sum, formed by the next layer's
        input norm in the same kernel (add_rms_norm). residual None: x is the embedding."""
        if residual_BSH is None:
            residual_BSH, normed_BSH = x_BSH, self.input_layernorm(x_BSH)
        else:
            residual_BSH, normed_BSH = add_rms_norm(x_BSH, residual_BSH, self.input_layernorm.weight, self.eps)
        attn_BSH = self.self_attn(normed_BSH, cos, sin, segments, kv_cache)
        residual_BSH, normed_BSH = add_rms_norm(attn_BSH, residual_BSH, self.post_attention_layernorm.weight, self.eps)
        return self.mlp(normed_BSH), residual_BSH


class HunyuanImage3Model(nn.Module):
    """The ``model.*`` part of the checkpoint: token embedding and decoder layers (``ln_f`` is text-only)."""

    def __init__(self, config: HunyuanImage3Config, params_dtype: torch.dtype | None = None):
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size, dtype=params_dtype)
        self.layers = nn.ModuleList(
            HunyuanImage3DecoderLayer(config, i, params_dtype, prefix=f"model.layers.{i}")
            for i in range(config.num_hidden_layers)
        )


class HunyuanImage3Transformer2DModel(nn.Module):
    """Velocity predictor of HunyuanImage-3.0; module names are the checkpoint's names.

    Build it after ``omni_ep.distributed.init_parallel_state``; load it with ``from_pretrained``.
    """

    def __init__(self, config: HunyuanImage3Config, params_dtype: torch.dtype | None = None):
        super().__init__()
        self.config = config
        H, C, P = config.hidden_size, config.latent_channels, config.patch_embed_hidden_dim
        self.model = HunyuanImage3Model(config, params_dtype)
        self.timestep_emb = HunyuanTimestepEmbedder(H)
        self.time_embed = HunyuanTimestepEmbedder(H)
        self.time_embed_2 = HunyuanTimestepEmbedder(H)
        self.patch_embed = HunyuanUNetDown(in_channels=C, emb_channels=H, hidden_channels=P, out_channels=H)
        self.final_layer = HunyuanUNetUp(in_channels=H, emb_channels=H, hidden_channels=P, out_channels=C)
        if params_dtype is not None:
            for module in (self.timestep_emb, self.time_embed, self.time_embed_2, self.patch_embed, self.final_layer):
                module.to(params_dtype)

    @classmethod
    def from_pretrained(cls, path, **kwargs) -> HunyuanImage3Transformer2DModel:
        """See ``omni_ep.models.hunyuan_image3.loading.load_transformer`` for the arguments."""
        from omni_ep.models.hunyuan_image3.loading import load_transformer

        return load_transformer(path, **kwargs)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.wte.weight.dtype

    def forward(
        self,
        latents: torch.Tensor,  # [B, C, h, w]
        timestep: torch.Tensor,  # [B], sigma * 1000
        image_slice: slice,  # the h*w image slots in the full sequence
        timestep_index: int,  # index of <timestep> in the full sequence
        input_ids: torch.Tensor | None = None,  # [B, S_full]; optional once kv_cache is filled
        kv_cache: HunyuanImage3KVCache | None = None,
    ) -> torch.Tensor:  # velocity [B, C, h, w]
        """One denoising evaluation. With ``kv_cache`` empty the whole sequence runs and the cache is filled;
        with it filled only tokens [timestep_index, image_slice.stop) run."""
        B, C, h, w = latents.shape
        img_start, img_stop = image_slice.start, image_slice.stop
        if img_stop - img_start != h * w:
            raise ValueError(
                f"image_slice {img_start}:{img_stop} holds {img_stop - img_start} slots but latents {h}x{w} need "
                f"{h * w}; build the sequence for this latent size"
            )
        if not 0 <= timestep_index < img_start:
            raise ValueError(
                f"timestep_index {timestep_index} must come before the image slots (start {img_start}): "
                "the template puts <timestep> right before <img>"
            )
        cached = kv_cache is not None and kv_cache.is_filled
        if cached:
            if kv_cache.prefix_len != timestep_index:
                raise ValueError(
                    f"the KV cache holds a prefix of {kv_cache.prefix_len} tokens but <timestep> is at "
                    f"{timestep_index}; reset() the cache for a new sequence"
                )
            q_start, seq_len = timestep_index, img_stop
        else:
            if input_ids is None:
                raise ValueError("input_ids [B, S] are required on a pass without a filled KV cache")
            if input_ids.shape[0] != B or input_ids.shape[1] < img_stop:
                raise ValueError(
                    f"input_ids {tuple(input_ids.shape)} must be [B={B}, S >= {img_stop}] (the image slots inside)"
                )
            q_start, seq_len = 0, input_ids.shape[1]
            if kv_cache is not None:
                kv_cache.begin_fill(timestep_index)

        device = latents.device
        x_BSH = self._embed(latents, timestep, input_ids, q_start, seq_len, timestep_index, image_slice)
        pos_y, pos_x = image_rope_positions(seq_len, img_start, h, w, device=device)
        cos, sin = rope_cos_sin(pos_y[q_start:], pos_x[q_start:], self.config.attention_head_dim, self.config.rope_theta)
        segments = attention_segments(seq_len, [(img_start, img_stop)], query_start=q_start)
        residual_BSH = None
        for layer in self.model.layers:
            x_BSH, residual_BSH = layer(x_BSH, residual_BSH, cos, sin, segments, kv_cache)
        x_BSH = x_BSH + residual_BSH
        if kv_cache is not None and not cached:
            kv_cache.end_fill()
        image_hidden = x_BSH[:, img_start - q_start : img_stop - q_start]  # no ln_f before final_layer
        return self.final_layer(image_hidden, self.time_embed_2(timestep), h, w)

    def _embed(self, latents, timestep, input_ids, q_start, seq_len, timestep_index, image_slice) -> torch.Tensor:
        """[B, seq_len - q_start, H] embeddings of the tokens this pass runs."""
        B = latents.shape[0]
        dtype = self.dtype
        if input_ids is not None:
            x_BSH = self.model.wte(input_ids[:, q_start:seq_len])
        elif image_slice.start - timestep_index > 1:
            raise ValueError(
                "input_ids are needed: tokens between <timestep> and the image are not in the KV cache"
            )
        else:
            x_BSH = torch.zeros(B, seq_len - q_start, self.config.hidden_size, dtype=dtype, device=latents.device)
        x_BSH = x_BSH.clone()
        x_BSH[:, timestep_index - q_start] = self.timestep_emb(timestep).to(dtype)
        image_tokens = self.patch_embed(latents.to(dtype), self.time_embed(timestep))
        x_BSH[:, image_slice.start - q_start : image_slice.stop - q_start] = image_tokens.to(dtype)
        return x_BSH
