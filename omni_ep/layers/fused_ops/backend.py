"""Where a fused op runs, and the fp32 math its Triton kernels share.

The kernels run on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1 (the interpreter); anything else
takes the op's torch path. triton.jit reads TRITON_INTERPRET when a kernel is defined, so the flag is read
here once, at import, as triton reads it.

On the GPU, exp and rsqrt call libdevice's expf / rsqrtf, the functions eager CUDA torch calls: tl.exp lowers
to ex2.approx of x * log2(e), which is further from expf. The interpreter has no libdevice; there they are
numpy's. Divisions are tl.math.div_rn (IEEE, as torch divides; Triton's `/` is the approximate div.full).
Kernels are launched with enable_fp_fusion=False: no multiply-add is contracted into an FMA, so every product
and sum rounds where eager torch rounds it.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
LIBDEVICE: tl.constexpr = tl.constexpr(not INTERPRETING)


def runs_triton(t: torch.Tensor) -> bool:
    """True when the fused ops launch their Triton kernel for tensors on t's device."""
    return t.is_cuda or (t.device.type == "cpu" and INTERPRETING)


@triton.jit
def exp_f32(x):
    if LIBDEVICE:
        y = libdevice.exp(x)
    else:
        y = tl.exp(x)
    return y


@triton.jit
def rsqrt_f32(x):
    if LIBDEVICE:
        y = libdevice.rsqrt(x)
    else:
        y = tl.rsqrt(x)
    return y
