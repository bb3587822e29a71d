"""Self-attention of HunyuanImage-3.0: GQA with qkv rows grouped per KV head, RoPE then QK-norm in fp32.

Shape legend: B batch, S query tokens, S_kv key tokens (cached text prefix + S), H hidden size,
N query heads on this rank, G = N / N_kv query heads per KV head, N_kv KV heads on this rank, D head dim.

Tensor parallel: ``qkv_proj`` is column-parallel. Its rows are grouped per KV head
([q_Gg .. q_Gg+G-1, k_g, v_g] x N_kv_total), so a contiguous 1/TP row chunk is a set of whole KV-head
groups whenever N_kv_total % TP == 0. ``o_proj`` is row-parallel and all-reduces over the TP group, or, with
``reduce_output=False``, leaves its partial sums to the caller (the decoder layer's reduce-scatter under TP x EP).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from omni_ep.distributed import get_tp_group
from omni_ep.layers.fused_ops import rms_norm, rope_qk_norm
from omni_ep.layers.linear import ColumnParallelLinear, RowParallelLinear
from omni_ep.models.hunyuan_image3.attention_mask import AttentionSegment
from omni_ep.models.hunyuan_image3.configuration import HunyuanImage3Config


class HunyuanImage3RMSNorm(nn.Module):
    """x [..., C] -> [..., C]: normalised in fp32, cast back to x's dtype, times weight [C] (one fused kernel on
    GPUs: omni_ep.layers.fused_ops.rms_norm)."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, dtype: torch.dtype | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class HunyuanImage3KVCache:
    """The text prefix's K/V of every layer, kept from the first denoising step.

    The prefix is every token before ``<timestep>``. Text never attends to the image, so its K/V do not
    change across steps; later steps run only ``[<timestep>, image tokens]`` and prepend the cached keys.
    Stored per layer after RoPE and QK-norm, before the GQA repeat: k, v [B, N_kv, L, D]. Under sequence
    parallel every rank stores the whole prefix of the KV heads its attention runs (see sequence_parallel.py).
    """

    def __init__(self):
        self.prefix_len: int | None = None
        self.filling = False
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}

    @property
    def is_filled(self) -> bool:
        """True once a whole first pass has stored every layer's prefix."""
        return self.prefix_len is not None and not self.filling

    def reset(self) -> None:
        self.prefix_len = None
        self.filling = False
        self.keys.clear()
        self.values.clear()

    def begin_fill(self, prefix_len: int) -> None:
        """Start recording: the next forward runs the whole sequence and stores its first prefix_len K/V."""
        self.reset()
        self.prefix_len = prefix_len
        self.filling = True

    def end_fill(self) -> None:
        self.filling = False

    def store_or_extend(
        self, layer_idx: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Filling: keep k, v [B, N_kv, :prefix_len, D] and return them unchanged.
        Filled: return cat(cached, k), cat(cached, v) [B, N_kv, prefix_len + S, D]."""
        cached = self.prefix(layer_idx, k.shape[0])
        if cached is None:
            self.store(layer_idx, k[:, :, : self.prefix_len], v[:, :, : self.prefix_len])
            return k, v
        return torch.cat([cached[0], k], dim=2), torch.cat([cached[1], v], dim=2)

    def prefix(self, layer_idx: int, batch: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The stored prefix k, v [B, N_kv, prefix_len, D] of a layer; None before the filling pass stored it."""
        if self.prefix_len is None:
            raise RuntimeError("call begin_fill(prefix_len) before the first forward that uses this cache")
        if layer_idx not in self.keys:
            return None
        if self.keys[layer_idx].shape[0] != batch:
            raise ValueError(
                f"the KV cache holds a batch of {self.keys[layer_idx].shape[0]} rows but this step has {batch}; "
                "call reset() when the batch changes"
            )
        return self.keys[layer_idx], self.values[layer_idx]

    def extended(self, layer_idx: int, batch: int, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """k, v [B, N_kv, prefix_len + num_tokens, D] (views of [B, S_kv, N_kv, D] memory, the SDPA kernels'
        layout) holding the cached prefix, the rest for the caller to write the step's keys and values into;
        None before the filling pass stored this layer's prefix."""
        cached = self.prefix(layer_idx, batch)
        if cached is None:
            return None
        B, N_kv, P, D = cached[0].shape
        k_BSKD, v_BSKD = (cached[0].new_empty(B, P + num_tokens, N_kv, D) for _ in range(2))
        k_BSKD[:, :P].copy_(cached[0].transpose(1, 2))
        v_BSKD[:, :P].copy_(cached[1].transpose(1, 2))
        return k_BSKD.transpose(1, 2), v_BSKD.transpose(1, 2)

    def store(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Keep a layer's prefix k, v [B, N_kv, prefix_len, D] (during the filling pass)."""
        self.keys[layer_idx], self.values[layer_idx] = k.contiguous(), v.contiguous()


class HunyuanImage3Attention(nn.Module):
    """hidden_states [B, S, H] -> [B, S, H] (all-reduced over TP; this rank's partial sum when not
    ``reduce_output``)."""

    def __init__(
        self,
        config: HunyuanImage3Config,
        layer_idx: int,
        params_dtype: torch.dtype | None = None,
        prefix: str = "",
        reduce_output: bool = True,
    ):
        super().__init__()
        tp_size = get_tp_group().world_size
        if config.num_key_value_heads % tp_size:
            raise ValueError(
                f"tensor_parallel_size={tp_size} must divide num_key_value_heads={config.num_key_value_heads} "
                "(each rank holds whole KV-head groups of qkv_proj); pick a TP size that divides it"
            )
        self.layer_idx = layer_idx
        self.head_dim = config.attention_head_dim
        self.num_heads = config.num_attention_heads // tp_size
        self.num_kv_heads = config.num_key_value_heads // tp_size
        self.group_size = config.num_attention_heads // config.num_key_value_heads

        self.qkv_proj = ColumnParallelLinear(
            config.hidden_size,
            config.qkv_rows,
            bias=config.attention_bias,
            gather_output=False,
            params_dtype=params_dtype,
            prefix=f"{prefix}.qkv_proj",
        )
        self.o_proj = RowParallelLinear(
            config.num_attention_heads * self.head_dim,
            config.hidden_size,
            bias=config.attention_bias,
            input_is_parallel=True,
            reduce_results=reduce_output,
            params_dtype=params_dtype,
            prefix=f"{prefix}.o_proj",
        )
        if not config.use_qk_norm:
            raise ValueError("use_qk_norm=false is not implemented (HunyuanImage-3.0 uses QK-norm)")
        self.query_layernorm = HunyuanImage3RMSNorm(self.head_dim, config.rms_norm_eps, params_dtype)
        self.key_layernorm = HunyuanImage3RMSNorm(self.head_dim, config.rms_norm_eps, params_dtype)
        self.sequence_parallel = None  # the sequence-parallel attention core, when the SP group has > 1 rank

    def split_qkv(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """qkv [B, S, N_kv * (G + 2) * D] -> q [B, N, S, D], k, v [B, N_kv, S, D] (grouped per KV head)."""
        B, S, _ = qkv.shape
        qkv = qkv.view(B, S, self.num_kv_heads, self.group_size + 2, self.head_dim)
        q, k, v = qkv.split([self.group_size, 1, 1], dim=3)
        q = q.reshape(B, S, self.num_heads, self.head_dim)
        return q.transpose(1, 2), k.squeeze(3).transpose(1, 2), v.squeeze(3).transpose(1, 2)

    def forward(
        self,
        hidden_states: torch.Tensor,  # [B, S, H]
        cos: torch.Tensor,  # [S, D] fp32
        sin: torch.Tensor,  # [S, D] fp32
        segments: Sequence[AttentionSegment],  # the pattern of queries [S_kv - S, S_kv)
        kv_cache: HunyuanImage3KVCache | None = None,
    ) -> torch.Tensor:
        qkv, _ = self.qkv_proj(hidden_states)
        B, S = qkv.shape[:2]
        # A cached step without sequence parallel: the step's keys and values go straight behind the prefix.
        kv_all = None
        if kv_cache is not None and self.sequence_parallel is None:
            kv_all = kv_cache.extended(self.layer_idx, B, S)
        # Split per KV head, RoPE in fp32, THEN the per-head RMSNorm (still fp32), then back to the model dtype:
        # one fused kernel on GPUs.
        q_BNSD, k_BKSD, v_BKSD = rope_qk_norm(
            qkv, cos, sin, self.query_layernorm.weight, self.key_layernorm.weight, self.query_layernorm.eps,
            self.num_kv_heads, self.group_size, self.head_dim,
            kv_out=None if kv_all is None else tuple(t[:, :, t.shape[2] - S :] for t in kv_all),
        )
        if kv_all is None:
            out_BSND = self.core_attention(q_BNSD, k_BKSD, v_BKSD, segments, kv_cache)
        else:
            out_BSND = segmented_attention(q_BNSD, *kv_all, segments)
        N, D = out_BSND.shape[2:]
        out, _ = self.o_proj(out_BSND.reshape(B, S, N * D))
        return out

    def core_attention(self, q_BNSD, k_BKSD, v_BKSD, segments, kv_cache) -> torch.Tensor:
        """Softmax attention of this rank's queries over every key they see (the prefix stored on a filling pass,
        prepended on a cached one): [B, S, N, D]. Under sequence parallel, ``sequence_parallel`` (set by
        ``apply_sequence_parallel``) runs it."""
        if self.sequence_parallel is not None:
            return self.sequence_parallel(q_BNSD, k_BKSD, v_BKSD, segments, kv_cache)
        if kv_cache is not None:
            k_BKSD, v_BKSD = kv_cache.store_or_extend(self.layer_idx, k_BKSD, v_BKSD)
        return segmented_attention(q_BNSD, k_BKSD, v_BKSD, segments)


def segmented_attention(
    q_BNSD: torch.Tensor, k_BKSD: torch.Tensor, v_BKSD: torch.Tensor, segments: Sequence[AttentionSegment]
) -> torch.Tensor:
    """Softmax attention of queries [S_kv - S, S_kv) over keys [0, S_kv), one call per segment: a mask-free key
    prefix (or plain causal from token 0) needs no mask tensor, and GQA is native (K/V heads are not repeated).
    Returns [B, S, N, D].

    The widest mask-free segment (most query rows) runs over ALL the queries and the other segments overwrite their
    rows of its output: no concatenation, and with q a view of [B, S, N, D] memory (rope_qk_norm's) the result is
    contiguous. A query row's softmax does not depend on the other rows of the call."""
    S_kv, q_offset = k_BKSD.shape[2], k_BKSD.shape[2] - q_BNSD.shape[2]
    if segments[0].q_start != q_offset or segments[-1].q_end != S_kv:
        raise ValueError(f"segments {segments} do not cover queries [{q_offset}, {S_kv})")
    plain = [seg for seg in segments if not seg.causal]
    widest = max(plain, key=lambda seg: seg.q_end - seg.q_start) if plain else None
    if widest is not None:
        whole = AttentionSegment(q_offset, S_kv, widest.kv_end, False)
        out_BNSD = _segment_attention(q_BNSD, k_BKSD, v_BKSD, whole, q_offset)
    else:
        B, N, S, _ = q_BNSD.shape
        out_BNSD = q_BNSD.new_empty(B, S, N, v_BKSD.shape[3]).transpose(1, 2)
    for seg in segments:
        if seg is not widest:
            out_BNSD[:, :, seg.q_start - q_offset : seg.q_end - q_offset] = _segment_attention(
                q_BNSD, k_BKSD, v_BKSD, seg, q_offset
            )
    return out_BNSD.transpose(1, 2)


def _segment_attention(q_BNSD, k_BKSD, v_BKSD, seg: AttentionSegment, q_offset: int) -> torch.Tensor:
    """One segment's queries over its keys: [B, N, q_end - q_start, D]."""
    q = q_BNSD[:, :, seg.q_start - q_offset : seg.q_end - q_offset]
    k, v = k_BKSD[:, :, : seg.kv_end], v_BKSD[:, :, : seg.kv_end]
    mask, is_causal = None, False
    if seg.causal and seg.q_start == 0:
        is_causal = True  # queries and keys start together: torch's causal alignment
    elif seg.causal:  # query i sees keys [0, i]
        keys = torch.arange(seg.kv_end, device=q.device)
        mask = keys[None, :] <= torch.arange(seg.q_start, seg.q_end, device=q.device)[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=True)
