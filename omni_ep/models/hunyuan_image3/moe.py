"""The MoE block of HunyuanImage-3.0: fp32 router, routed experts (expert- or tensor-parallel), shared MLP.

Shape legend: T tokens, H hidden size, E experts, I intermediate size.

    shared = down(up(x) * silu(gate(x)))              # always on; gate_and_up_proj stored [up; gate]
    logits = x.float() @ wg.T                          # fp32 router, weights replicated on every rank
    w, idx = topk(softmax(logits)), renormalised       # inside FusedMoE
    out    = shared + sum_k w_k * Expert_{idx_k}(x)

The routed experts are a ``FusedMoE`` (the subclass the platform names for the op "hunyuan_fused_moe":
``CudaFusedMoE`` with the Triton experts, ``AscendFusedMoE``, or ``FusedMoE`` itself on CPU). It also runs the
shared MLP, whose weights are replicated, on each TP rank's own chunk of the (TP-identical) tokens while routed
tokens are in flight, and owns the one TP collective that completes both terms. Under expert parallel each TP
rank also routes only its chunk (``FusedMoE.routed_rows``), so the router runs on that chunk alone.
"""

from __future__ import annotations

import torch
from torch import nn

from omni_ep import platforms
from omni_ep.layers.fused_moe import FusedMoE
from omni_ep.layers.fused_ops import swiglu
from omni_ep.layers.linear import ReplicatedLinear
from omni_ep.models.hunyuan_image3.configuration import HunyuanImage3Config
from omni_ep.utils import resolve_obj_by_qualname

FUSED_MOE_OP = "hunyuan_fused_moe"


def fused_moe_class() -> type[FusedMoE]:
    """The FusedMoE class of the current platform for the op "hunyuan_fused_moe", its runtime prepared."""
    platform = platforms.current_omni_platform  # resolved now, not at import time
    platform.prepare_diffusion_op_runtime(FUSED_MOE_OP)
    cls = resolve_obj_by_qualname(platform.get_diffusion_model_impl_qualname(FUSED_MOE_OP))
    if not (isinstance(cls, type) and issubclass(cls, FusedMoE)):
        raise TypeError(f"platform {platform.name!r} names {cls!r} for {FUSED_MOE_OP!r}, which is not a FusedMoE")
    return cls


class HunyuanImage3Router(nn.Module):
    """x [T, H] -> router logits [T, E] fp32. Checkpoint key ``gate.wg.weight`` [E, H], held in fp32."""

    def __init__(self, hidden_size: int, num_experts: int, prefix: str = ""):
        super().__init__()
        self.wg = ReplicatedLinear(
            hidden_size, num_experts, bias=False, params_dtype=torch.float32, prefix=f"{prefix}.wg"
        )

    def forward(self, x_TH: torch.Tensor) -> torch.Tensor:
        logits_TE, _ = self.wg(x_TH.float())
        return logits_TE


class HunyuanImage3SharedMLP(nn.Module):
    """x [T, H] -> [T, H]: SwiGLU with the fused [up; gate] projection (activation on the SECOND half)."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        bias: bool = False,
        params_dtype: torch.dtype | None = None,
        prefix: str = "",
    ):
        super().__init__()
        self.gate_and_up_proj = ReplicatedLinear(
            hidden_size, 2 * intermediate_size, bias=bias, params_dtype=params_dtype, prefix=f"{prefix}.gate_and_up_proj"
        )
        self.down_proj = ReplicatedLinear(
            intermediate_size, hidden_size, bias=bias, params_dtype=params_dtype, prefix=f"{prefix}.down_proj"
        )

    def forward(self, x_TH: torch.Tensor) -> torch.Tensor:
        up_gate_T2I, _ = self.gate_and_up_proj(x_TH)
        out_TH, _ = self.down_proj(swiglu(up_gate_T2I))  # up * silu(gate), one fused kernel on GPUs
        return out_TH


class HunyuanImage3MoE(nn.Module):
    """hidden_states [..., H] -> [..., H]: shared MLP + routed experts, complete (TP-reduced)."""

    def __init__(
        self, config: HunyuanImage3Config, layer_idx: int, params_dtype: torch.dtype | None = None, prefix: str = "",
        quantization: str | None = None,
    ):
        super().__init__()
        self.gate = HunyuanImage3Router(config.hidden_size, config.num_experts, prefix=f"{prefix}.gate")
        self.experts: FusedMoE = fused_moe_class()(
            num_experts=config.num_experts,
            top_k=config.moe_topk_at(layer_idx),
            hidden_size=config.hidden_size,
            intermediate_size=config.moe_intermediate_size_at(layer_idx),
            renormalize=config.norm_topk_prob,
            params_dtype=params_dtype,
            prefix=f"{prefix}.experts",
            quantization=quantization,
        )
        self.shared_mlp = HunyuanImage3SharedMLP(
            config.hidden_size,
            config.shared_mlp_intermediate_size_at(layer_idx),
            bias=config.mlp_bias,
            params_dtype=params_dtype,
            prefix=f"{prefix}.shared_mlp",
        )

    def forward_routed_rows(self, x_CH: torch.Tensor) -> torch.Tensor:
        """Expert parallel: x [C, H], this TP rank's row chunk (``experts.routed_rows``) -> [C, H], not joined over
        TP (the decoder layer keeps the hidden states in TP row chunks)."""
        return self.experts.forward_routed_rows(x_CH, self.gate(x_CH), shared_experts=self.shared_mlp)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x_TH = hidden_states.reshape(-1, shape[-1])
        start, end = self.experts.routed_rows(x_TH.shape[0])  # under TP x EP each TP rank routes its chunk
        router_logits_CE = self.gate(x_TH[start:end])
        return self.experts(x_TH, router_logits_CE, shared_experts=self.shared_mlp).reshape(shape)
