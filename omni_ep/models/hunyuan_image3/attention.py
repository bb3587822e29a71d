"""Self-attention of HunyuanImage-3.0: GQA with qkv rows grouped per KV head, RoPE then QK-norm in fp32.

Shape legend: B batch, S query tokens, S_kv key tokens (cached text prefix + S), H hidden size,
N query heads on this rank, G = N / N_kv query heads per KV head, N_kv KV heads on this rank, D head dim.

Tensor parallel: ``qkv_proj`` is column-parallel. Its rows are grouped per KV head
([q_Gg .. q_Gg+G-1, k_g, v_g] x N_kv_total), so a contiguous 1/TP row chunk is a set of whole KV-head
groups whenever N_kv_total % TP == 0. ``o_proj`` is row-parallel and all-reduces over the TP group.
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
    Stored per layer after RoPE and QK-norm, before the GQA repeat: k, v [B, N_kv, L, D].
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
        if self.prefix_len is None:
            raise RuntimeError("call begin_fill(prefix_len) before the first forward that uses this cache")
        if layer_idx not in self.keys:
            self.keys[layer_idx] = k[:, :, : self.prefix_len].contiguous()
            self.values[layer_idx] = v[:, :, : self.prefix_len].contiguous()
            return k, v
        cached_k, cached_v = self.keys[layer_idx], self.values[layer_idx]
        if cached_k.shape[0] != k.shape[0]:
            raise ValueError(
                f"the KV cache holds a batch of {cached_k.shape[0]} rows but this step has {k.shape[0]}; "
                "call reset() when the batch changes"
            )
        return torch.cat([cached_k, k], dim=2), torch.cat([cached_v, v], dim=2)


class HunyuanImage3Attention(nn.Module):
    """hidden_states [B, S, H] -> [B, S, H] (all-reduced over TP)."""

    def __init__(
        self, config: HunyuanImage3Config, layer_idx: int, params_dtype: torch.dtype | None = None, prefix: str = ""
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
            reduce_results=True,
            params_dtype=params_dtype,
            prefix=f"{prefix}.o_proj",
        )
        if not config.use_qk_norm:
            raise ValueError("use_qk_norm=false is not implemented (HunyuanImage-3.0 uses QK-norm)")
        self.query_layernorm = HunyuanImage3RMSNorm(self.head_dim, config.rms_norm_eps, params_dtype)
        self.key_layernorm = HunyuanImage3RMSNorm(self.head_dim, config.rms_norm_eps, params_dtype)

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
        # Split per KV head, RoPE in fp32, THEN the per-head RMSNorm (still fp32), then back to the model dtype:
        # one fused kernel on GPUs.
        q_BNSD, k_BKSD, v_BKSD = rope_qk_norm(
            qkv, cos, sin, self.query_layernorm.weight, self.key_layernorm.weight, self.query_layernorm.eps,
            self.num_kv_heads, self.group_size, self.head_dim,
        )
        if kv_cache is not None:
            k_BKSD, v_BKSD = kv_cache.store_or_extend(self.layer_idx, k_BKSD, v_BKSD)
        out_BSND = segmented_attention(q_BNSD, k_BKSD, v_BKSD, segments)
        B, S, N, D = out_BSND.shape
        out, _ = self.o_proj(out_BSND.reshape(B, S, N * D))
        return out


def segmented_attention(
    q_BNSD: torch.Tensor, k_BKSD: torch.Tensor, v_BKSD: torch.Tensor, segments: Sequence[AttentionSegment]
) -> torch.Tensor:
    """Softmax attention of queries [S_kv - S, S_kv) over keys [0, S_kv), one call per segment: a mask-free key
    prefix (or plain causal from token 0) needs no mask tensor, and GQA is native (K/V heads are not repeated).
    Returns [B, S, N, D]."""
    S_kv, q_offset = k_BKSD.shape[2], k_BKSD.shape[2] - q_BNSD.shape[2]
    if segments[0].q_start != q_offset or segments[-1].q_end != S_kv:
        raise ValueError(f"segments {segments} do not cover queries [{q_offset}, {S_kv})")
    outs = []
    for seg in segments:
        q = q_BNSD[:, :, seg.q_start - q_offset : seg.q_end - q_offset]
        k, v = k_BKSD[:, :, : seg.kv_end], v_BKSD[:, :, : seg.kv_end]
        mask, is_causal = None, False
        if seg.causal and seg.q_start == 0:
            is_causal = True  # queries and keys start together: torch's causal alignment
        elif seg.causal:  # query i sees keys [0, i]
            keys = torch.arange(seg.kv_end, device=q.device)
            mask = keys[None, :] <= torch.arange(seg.q_start, seg.q_end, device=q.device)[:, None]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=True)
        outs.append(out.transpose(1, 2))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
