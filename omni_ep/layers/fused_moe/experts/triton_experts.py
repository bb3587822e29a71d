"""Local-expert compute in Triton: align pairs to blocks, gate_up GEMM + SwiGLU, down GEMM + weight +
un-permute (in its stores, or, where down writes expert-sorted rows, in the top-k sum's loads), top-k sum. No
host sync anywhere: safe for CUDA graphs and overlapped communication. FP8 weights: on Hopper, torch's FP8 grouped
GEMM (fp8_grouped_gemm.py); elsewhere x and h are quantized per row (quantize_rows.py) before the Triton GEMMs,
which scale their fp32 accumulators in the epilogue.

Shape legend: M tokens, K top-k slots, P = M*K pairs, H hidden, I intermediate, E local experts,
R padded expert-sorted rows.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

from omni_ep.layers.fused_moe.experts import fp8_grouped_gemm
from omni_ep.layers.fused_moe.experts.base import LocalExperts, check_fp8_weights
from omni_ep.layers.fused_moe.experts.triton_configs import MoEConfig, fit_fp8, fit_fp32, moe_config

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


class TritonExperts(LocalExperts):
    """Fused-MoE local experts in Triton; tile sizes from the tuned JSON files (see triton_configs.py).

    config: a fixed tile configuration (the tuner and tests use it; a dict goes through MoEConfig.from_dict);
    None picks one per call by device name, E, I and M from config_dir (default: the package's configs/).
    """

    name = "triton"

    def __init__(self, config: MoEConfig | dict | None = None, config_dir: Path | None = None):
        self.config = MoEConfig.from_dict(config) if isinstance(config, dict) else config
        self.config_dir = config_dir

    @classmethod
    def unsupported_reason(cls, device: torch.device, dtype: torch.dtype) -> str | None:
        device = torch.device(device)
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed; install triton or use the 'torch' experts."
        if dtype not in _DTYPES:
            return f"the Triton experts take bf16, fp16 or fp32 activations, not {dtype}."
        if device.type == "cuda":
            return None
        if device.type == "cpu" and _interpreting():
            return None
        if device.type == "cpu":
            return "the Triton experts run on CPU only under TRITON_INTERPRET=1 (set before importing triton)."
        return f"the Triton experts run on CUDA devices, not {device.type}."

    @classmethod
    def fp8_unsupported_reason(cls, device):
        device = torch.device(device)
        if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
            major, minor = torch.cuda.get_device_capability(device)
            return (f"FP8 matrix multiplies need compute capability 8.9 or later (Ada, Hopper); this GPU has "
                    f"{major}.{minor}")
        return None

    def config_for(self, hidden_states: torch.Tensor, num_experts: int, intermediate_size: int) -> MoEConfig:
        """The tile configuration apply() uses for these activations [M, H] and expert shapes."""
        config = self.config
        if config is None:
            dev = hidden_states.device
            name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
            config = moe_config(num_experts, intermediate_size, hidden_states.shape[0], name, self.config_dir)
        if hidden_states.dtype == torch.float32 and hidden_states.device.type == "cuda":
            config = fit_fp32(config)
        return config

    @staticmethod
    def num_sms(device: torch.device) -> int:
        if device.type == "cuda":
            return torch.cuda.get_device_properties(device).multi_processor_count
        return 4  # the interpreter runs programs one after another: a few suffice

    def apply(self, hidden_states, topk_ids, topk_weights, w13, w2, w13_scale=None, w2_scale=None):
        from omni_ep.layers.fused_moe.experts.triton_kernels.align import align_pairs_to_blocks
        from omni_ep.layers.fused_moe.experts.triton_kernels.down_unpermute import down_unpermute
        from omni_ep.layers.fused_moe.experts.triton_kernels.gate_up_swiglu import gate_up_swiglu
        from omni_ep.layers.fused_moe.experts.triton_kernels.quantize_rows import quantize_rows_fp8
        from omni_ep.layers.fused_moe.experts.triton_kernels.topk_sum import topk_sum

        x_MH = hidden_states
        reason = self.unsupported_reason(x_MH.device, x_MH.dtype)
        if reason is not None:
            raise ValueError(f"TritonExperts: {reason}")
        M, H = x_MH.shape
        E, two_I, H_w = w13.shape
        I = two_I // 2
        if H_w != H or w2.shape != (E, H, I) or topk_ids.shape != topk_weights.shape or topk_ids.shape[0] != M:
            raise ValueError(
                f"TritonExperts: shapes do not agree: hidden_states {tuple(x_MH.shape)}, topk_ids "
                f"{tuple(topk_ids.shape)}, topk_weights {tuple(topk_weights.shape)}, w13 {tuple(w13.shape)} "
                f"(want [E, 2I, H]), w2 {tuple(w2.shape)} (want [E, H, I])."
            )
        fp8 = check_fp8_weights("TritonExperts", w13, w2, w13_scale, w2_scale)
        if not fp8 and (w13.dtype != x_MH.dtype or w2.dtype != x_MH.dtype):
            raise ValueError(
                f"TritonExperts: weights ({w13.dtype}, {w2.dtype}) must have the activations' dtype {x_MH.dtype}."
            )
        x_MH, w13, w2 = (t if t.stride(-1) == 1 else t.contiguous() for t in (x_MH, w13, w2))
        if fp8 and fp8_grouped_gemm.runs_here(x_MH, I):
            return fp8_grouped_gemm.fp8_grouped_experts(x_MH, topk_ids, topk_weights, w13, w2, w13_scale, w2_scale)
        config = self.config_for(x_MH, E, I)
        if fp8:
            config = fit_fp8(config)
        K = topk_ids.shape[1]
        sms = self.num_sms(x_MH.device)
        align = align_pairs_to_blocks(topk_ids, E, config.block_m)
        if not fp8:
            h_RI = gate_up_swiglu(x_MH, w13, align, K, config.gate_up, sms)
            y, row_of_pair_P = down_unpermute(h_RI, w2, topk_weights, align, config.down, sms)
            return topk_sum(y, topk_ids, E, row_of_pair_P)
        x_q_MH, x_scale_M = quantize_rows_fp8(x_MH)
        h_RI = gate_up_swiglu(x_q_MH, w13, align, K, config.gate_up, sms, x_scale_M, w13_scale, x_MH.dtype)
        h_q_RI, h_scale_R = quantize_rows_fp8(h_RI, align.num_padded_rows)
        y, row_of_pair_P = down_unpermute(h_q_RI, w2, topk_weights, align, config.down, sms, h_scale_R, w2_scale,
                                          x_MH.dtype)
        return topk_sum(y, topk_ids, E, row_of_pair_P)
