"""Fused element-wise ops of a decoder layer: RMSNorm (with the residual add), RoPE + QK-norm straight from the
fused qkv projection, the router's softmax + top-k, the shared MLP's SwiGLU, and the all-to-all dispatch's row
copies and combine's gather + sum. Each is one Triton kernel with a torch path that computes the same function
(used off CUDA unless TRITON_INTERPRET=1)."""

from omni_ep.layers.fused_ops.rms_norm import add_rms_norm, rms_norm
from omni_ep.layers.fused_ops.rope_qk_norm import rope_qk_norm
from omni_ep.layers.fused_ops.router_topk import router_topk
from omni_ep.layers.fused_ops.swiglu import swiglu
from omni_ep.layers.fused_ops.token_blocks import gather_sum, scatter_rows

__all__ = ["add_rms_norm", "gather_sum", "rms_norm", "rope_qk_norm", "router_topk", "scatter_rows", "swiglu"]
