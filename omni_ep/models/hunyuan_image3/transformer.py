"""The HunyuanImage-3.0 transformer, as a text-to-image denoiser: latents + timestep -> velocity.

Shape legend: B batch (cond and uncond rows for CFG), S tokens this pass runs, S_kv = S plus the cached
text prefix, H hidden size (4096), C latent channels (32), h x w latent grid, D head dim.

The sequence (template "pretrain"):
    <bos> prompt <boi> <img_size_1024> <img_ratio_k> <timestep> <img> x (h*w) <eoi>
Embeddings are ``wte(input_ids)`` with the ``<timestep>`` slot replaced by ``timestep_emb(t)`` and the image
slots by ``patch_embed(latents, time_embed(t))``. After the decoder layers the hidden states at the image
slots go, WITHOUT ``ln_f``, through ``final_layer(., time_embed_2(t))``.

Instruct-Distil adds two meta slots after ``<timestep>``: ``<guidance>`` (``cfg_distilled``) gets
``guidance_emb(G)`` and ``<timestep_r>`` (``use_meanflow``) gets ``timestep_r_emb(r)``, in that order, right
before the image. They condition nothing else (patch_embed and final_layer still take t).

Text-prefix KV cache: the prefix is every token before ``<timestep>``. Step 0 runs the whole sequence and
stores the prefix K/V; later steps run only the meta slots (``<timestep>`` [``<guidance>``] [``<timestep_r>``])
and the image tokens, whose embeddings all come from the embedders (no input_ids needed). Tokens after the
image (``<eoi>``, ``</answer>``, ...) are dropped there: under the mask no image token attends to a later token.

Sequence parallel (``sequence_parallel.py``): each SP rank runs a contiguous share of the pass's tokens through
the decoder layers (attention by ulysses / ring exchanges); the shares are gathered again before ``final_layer``.

Tensor x expert parallel (``hidden_in_tp_chunks``): between layers each TP rank holds only its row chunk of the
B x S tokens (the MoE routes exactly that chunk). A layer all-gathers the normed chunks before ``qkv_proj`` and
reduce-scatters ``o_proj``'s partial sums back to chunks: two collectives a layer, where the replicated hidden
states need an all-reduce after ``o_proj`` and an all-gather after the MoE. When B is a multiple of TP the chunks
are whole samples (``_own_samples``): each TP rank also embeds and decodes only its own.

Placement of every weight (``PLACEMENT``): "column"/"row" are TP-sharded (contiguous row / column chunks),
"expert" tensors live only on the EP rank that owns the expert (TP-sharded in I when EP is off),
"replicated" is held whole by every rank.
"""

from __future__ import annotations

import torch
from torch import nn

from omni_ep.distributed import get_ep_group, get_sp_group, get_tp_group
from omni_ep.distributed.row_chunks import row_chunk
from omni_ep.distributed.sequence_shards import SequenceShards
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
from omni_ep.models.hunyuan_image3.sequence_parallel import apply_sequence_parallel, gather_pass, split_pass

# Checkpoint name pattern -> how it is split over ranks. Anything not listed is replicated.
PLACEMENT = {
    "model.layers.*.self_attn.qkv_proj.weight": "column (whole KV-head groups per TP rank)",
    "model.layers.*.self_attn.o_proj.weight": "row (input columns; all-reduce over TP, or reduce-scatter to TP row "
                                              "chunks under TP x EP)",
    "model.layers.*.mlp.experts.*.gate_and_up_proj.weight": "expert (owner EP rank; [up; gate] -> w13 [gate; up])",
    "model.layers.*.mlp.experts.*.down_proj.weight": "expert (owner EP rank) -> w2",
    "model.layers.*.mlp.gate.wg.weight": "replicated, fp32",
    "model.layers.*.mlp.shared_mlp.*": "replicated weights; each TP rank runs its 1/TP chunk of the tokens",
    "model.wte.weight": "replicated",
    "timestep_emb.* / time_embed.* / time_embed_2.* / patch_embed.* / final_layer.*": "replicated",
    "guidance_emb.* / timestep_r_emb.* (Instruct-Distil only)": "replicated",
}

# Checkpoint tensors a text-to-image run never reads.
SKIPPED_PREFIXES = ("vision_model.", "vision_aligner.", "vae.", "lm_head.", "model.ln_f.")


def hidden_in_tp_chunks() -> bool:
    """True under TP x EP: the decoder layers pass each TP rank's row chunk of the hidden states, not all rows."""
    return get_tp_group().world_size > 1 and get_ep_group().world_size > 1


class HunyuanImage3DecoderLayer(nn.Module):
    """Pre-norm block: h = x + Attn(RMSNorm(x)); y = h + MoE(RMSNorm(h)). [B, S, H] -> [B, S, H], or this TP
    rank's row chunk [C, H] -> [C, H] of the B x S rows under TP x EP (``hidden_in_tp_chunks``)."""

    def __init__(
        self, config: HunyuanImage3Config, layer_idx: int, params_dtype: torch.dtype | None = None, prefix: str = "",
        quantization: str | None = None,
    ):
        super().__init__()
        H, eps = config.hidden_size, config.rms_norm_eps
        self.eps = eps
        self.tp_group, self.tp_chunks = get_tp_group(), hidden_in_tp_chunks()
        self.input_layernorm = HunyuanImage3RMSNorm(H, eps, params_dtype)
        self.self_attn = HunyuanImage3Attention(
            config, layer_idx, params_dtype, prefix=f"{prefix}.self_attn", reduce_output=not self.tp_chunks
        )
        self.post_attention_layernorm = HunyuanImage3RMSNorm(H, eps, params_dtype)
        self.mlp = HunyuanImage3MoE(config, layer_idx, params_dtype, prefix=f"{prefix}.mlp", quantization=quantization)

    def forward(
        self, x, residual, cos, sin, segments, kv_cache=None, batch_tokens=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, residual) -> (MoE output, residual): the layer's output is their sum, formed by the next layer's
        input norm in the same kernel (add_rms_norm). residual None: x is the embedding. Under TP x EP, x and
        residual are row chunks [C, H] and batch_tokens is (B, S), the shape of all rows."""
        if self.tp_chunks and batch_tokens is None:
            raise ValueError("under TP x EP the layer takes row chunks: pass batch_tokens=(B, S) of all rows")
        if residual is None:
            residual, normed = x, self.input_layernorm(x)
        else:
            residual, normed = add_rms_norm(x, residual, self.input_layernorm.weight, self.eps)
        if self.tp_chunks:
            B, S = batch_tokens
            normed = self.tp_group.all_gather_row_chunks(normed, B * S).view(B, S, -1)
        attn = self.self_attn(normed, cos, sin, segments, kv_cache)
        if self.tp_chunks:
            attn = self.tp_group.reduce_scatter_row_chunks(attn.view(-1, attn.shape[-1]))
        residual, normed = add_rms_norm(attn, residual, self.post_attention_layernorm.weight, self.eps)
        return (self.mlp.forward_routed_rows(normed) if self.tp_chunks else self.mlp(normed)), residual


class HunyuanImage3Model(nn.Module):
    """The ``model.*`` part of the checkpoint: token embedding and decoder layers (``ln_f`` is text-only)."""

    def __init__(self, config: HunyuanImage3Config, params_dtype: torch.dtype | None = None,
                 quantization: str | None = None):
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size, dtype=params_dtype)
        self.layers = nn.ModuleList(
            HunyuanImage3DecoderLayer(config, i, params_dtype, prefix=f"model.layers.{i}", quantization=quantization)
            for i in range(config.num_hidden_layers)
        )


class HunyuanImage3Transformer2DModel(nn.Module):
    """Velocity predictor of HunyuanImage-3.0; module names are the checkpoint's names.

    Build it after ``omni_ep.distributed.init_parallel_state``; load it with ``from_pretrained``. quantization
    "fp8": the routed experts in FP8 (``omni_ep.layers.fused_moe.fp8``; not exact), everything else in
    params_dtype.
    """

    def __init__(self, config: HunyuanImage3Config, params_dtype: torch.dtype | None = None,
                 quantization: str | None = None):
        super().__init__()
        self.config = config
        H, C, P = config.hidden_size, config.latent_channels, config.patch_embed_hidden_dim
        self.model = HunyuanImage3Model(config, params_dtype, quantization)
        self.timestep_emb = HunyuanTimestepEmbedder(H)
        self.time_embed = HunyuanTimestepEmbedder(H)
        self.time_embed_2 = HunyuanTimestepEmbedder(H)
        self.patch_embed = HunyuanUNetDown(in_channels=C, emb_channels=H, hidden_channels=P, out_channels=H)
        self.final_layer = HunyuanUNetUp(in_channels=H, emb_channels=H, hidden_channels=P, out_channels=C)
        # Instruct-Distil: the embedders of the <guidance> and <timestep_r> slots, built iff config.json says so.
        self.guidance_emb = HunyuanTimestepEmbedder(H) if config.cfg_distilled else None
        self.timestep_r_emb = HunyuanTimestepEmbedder(H) if config.use_meanflow else None
        if params_dtype is not None:
            for module in (self.timestep_emb, self.time_embed, self.time_embed_2, self.patch_embed, self.final_layer,
                           self.guidance_emb, self.timestep_r_emb):
                if module is not None:
                    module.to(params_dtype)
        self.sp_group = get_sp_group()  # size 1 without sequence parallel
        self.tp_group, self.tp_chunks = get_tp_group(), hidden_in_tp_chunks()
        apply_sequence_parallel(self, config)

    @classmethod
    def from_pretrained(cls, path, **kwargs) -> HunyuanImage3Transformer2DModel:
        """See ``omni_ep.models.hunyuan_image3.loading.load_transformer`` for the arguments."""
        from omni_ep.models.hunyuan_image3.loading import load_transformer

        return load_transformer(path, **kwargs)

    def adapters_channels_last(self) -> HunyuanImage3Transformer2DModel:
        """Store patch_embed's and final_layer's conv weights channels-last (the loader does on CUDA). final_layer's
        input, a view of the tokens [B, h*w, H], is [B, H, h, w] channels-last already, and patch_embed's output
        flattens to the tokens without a copy. On an H200, a sample's patch_embed then takes 3.13 instead of
        3.85 ms and final_layer 1.61 instead of 1.80 ms, bit-equal (benchmarks/results/adapters_h200.json)."""
        for adapter in (self.patch_embed, self.final_layer):
            adapter.to(memory_format=torch.channels_last)
        return self

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
        guidance: torch.Tensor | None = None,  # [B], G = bf16(1000 * g); iff config.cfg_distilled
        timestep_r: torch.Tensor | None = None,  # [B], r = next sigma * 1000; iff config.use_meanflow
    ) -> torch.Tensor:  # velocity [B, C, h, w]
        """One denoising evaluation. With ``kv_cache`` empty the whole sequence runs and the cache is filled;
        with it filled only tokens [timestep_index, image_slice.stop) run. The meta slots are
        ``config.meta_slots`` from ``timestep_index`` on (<timestep> [<guidance>] [<timestep_r>])."""
        B, C, h, w = latents.shape
        img_start, img_stop = image_slice.start, image_slice.stop
        if img_stop - img_start != h * w:
            raise ValueError(
                f"image_slice {img_start}:{img_stop} holds {img_stop - img_start} slots but latents {h}x{w} need "
                f"{h * w}; build the sequence for this latent size"
            )
        num_slots = len(self.config.meta_slots)
        if not 0 <= timestep_index <= img_start - num_slots:
            raise ValueError(
                f"timestep_index {timestep_index} must come before the image slots (start {img_start}) with room for "
                f"the {num_slots} meta slot(s) {self.config.meta_slots}: the template puts them right before <img>"
            )
        slot_values = self._meta_slot_values(timestep, guidance, timestep_r)  # checked before the cache is touched
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
        own = self._own_samples(B)
        if own is not None:  # this TP rank's row chunk is whole samples: it embeds and decodes only those
            latents, timestep, slot_values = latents[own], timestep[own], [v[own] for v in slot_values]
            input_ids = None if input_ids is None else input_ids[own]
        x_BSH = self._embed(latents, timestep, input_ids, q_start, seq_len, timestep_index, image_slice, slot_values)
        pos_y, pos_x = image_rope_positions(seq_len, img_start, h, w, device=device)
        cos, sin = rope_cos_sin(pos_y[q_start:], pos_x[q_start:], self.config.attention_head_dim, self.config.rope_theta)
        segments = attention_segments(seq_len, [(img_start, img_stop)], query_start=q_start)
        shards = SequenceShards(q_start, seq_len, self.sp_group.world_size)
        if shards.world_size > 1:  # this rank runs its share of the tokens (see sequence_parallel.py)
            x_BSH, cos, sin, segments = split_pass(shards, self.sp_group.rank, x_BSH, cos, sin, segments)
        _, S, H = x_BSH.shape
        x, residual = x_BSH, None
        if own is not None:
            x = x_BSH.reshape(-1, H)
        elif self.tp_chunks:  # this TP rank's rows of the B x S tokens (the decoder layer's docstring)
            start, end = row_chunk(B * S, self.tp_group.rank, self.tp_group.world_size)
            x = x_BSH.reshape(B * S, H)[start:end]
        for layer in self.model.layers:
            x, residual = layer(x, residual, cos, sin, segments, kv_cache, batch_tokens=(B, S))
        x_BSH = x + residual
        if own is not None:
            x_BSH = x_BSH.view(-1, S, H)
        elif self.tp_chunks:
            x_BSH = self.tp_group.all_gather_row_chunks(x_BSH, B * S).view(B, S, H)
        if kv_cache is not None and not cached:
            kv_cache.end_fill()
        if shards.world_size > 1:
            x_BSH = gather_pass(shards, self.sp_group, x_BSH)
        image_hidden = x_BSH[:, img_start - q_start : img_stop - q_start]  # no ln_f before final_layer
        velocity = self.final_layer(image_hidden, self.time_embed_2(timestep), h, w)
        return velocity if own is None else self.tp_group.all_gather(velocity, dim=0)

    def _own_samples(self, B: int) -> slice | None:
        """Under TP x EP with B a multiple of TP (CFG's cond and uncond rows on TP2), each TP rank's row chunk of
        the B x S tokens is whole samples: the slice of them, else None. The rank then runs patch_embed and
        final_layer (convolutions over the latent grid) on its own samples only and the [B, C, h, w] velocities
        are all-gathered, instead of every TP rank convolving all B samples."""
        tp = self.tp_group.world_size
        if not self.tp_chunks or B % tp:
            return None
        per_rank = B // tp
        return slice(self.tp_group.rank * per_rank, (self.tp_group.rank + 1) * per_rank)

    def _meta_slot_values(self, timestep, guidance, timestep_r) -> list[torch.Tensor]:
        """[B, H] embedding of each meta slot, in ``config.meta_slots`` order; checks that the values the
        checkpoint expects are given and no other."""
        given = {"guidance": guidance, "timestep_r": timestep_r}
        flags = {"guidance": "cfg_distilled", "timestep_r": "use_meanflow"}
        for name, value in given.items():
            wanted = name in self.config.meta_slots
            if wanted and value is None:
                raise ValueError(f"this checkpoint has {flags[name]}=true: pass {name} [B] on every step")
            if not wanted and value is not None:
                raise ValueError(f"{name} was given but this checkpoint has no {flags[name]} (no <{name}> slot)")
        embedders = {"timestep": self.timestep_emb, "guidance": self.guidance_emb, "timestep_r": self.timestep_r_emb}
        values = {"timestep": timestep, **given}
        return [embedders[name](values[name]) for name in self.config.meta_slots]

    def _embed(self, latents, timestep, input_ids, q_start, seq_len, timestep_index, image_slice, slot_values):
        """[B, seq_len - q_start, H] embeddings of the tokens this pass runs."""
        B = latents.shape[0]
        dtype = self.dtype
        if input_ids is not None:
            x_BSH = self.model.wte(input_ids[:, q_start:seq_len])
        elif image_slice.start - timestep_index > len(slot_values):
            raise ValueError(
                f"input_ids are needed: tokens between <timestep> and the image other than the meta slots "
                f"{self.config.meta_slots} are not in the KV cache"
            )
        else:
            x_BSH = torch.zeros(B, seq_len - q_start, self.config.hidden_size, dtype=dtype, device=latents.device)
        x_BSH = x_BSH.clone()
        for offset, value_BH in enumerate(slot_values):  # <timestep> [<guidance>] [<timestep_r>]
            x_BSH[:, timestep_index + offset - q_start] = value_BH.to(dtype)
        image_tokens = self.patch_embed(latents.to(dtype), self.time_embed(timestep))
        x_BSH[:, image_slice.start - q_start : image_slice.stop - q_start] = image_tokens.to(dtype)
        return x_BSH
