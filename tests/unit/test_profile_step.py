"""benchmarks/profile_step.py's arithmetic on known intervals (microseconds): categories and exchange times."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import profile_step  # noqa: E402


def test_categories():
    assert profile_step.category("ncclDevKernel_SendRecv(ncclDevKernelArgsStorage<4096ul>)") == "nccl"
    assert profile_step.category("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7") == "attention"
    assert profile_step.category("sm80_xmma_fprop_implicit_gemm_indexed_bf16bf16_bf16f32_f32_nhwckrsc_nhwc__5x_cudnn") == "conv"
    assert profile_step.category("_gate_up_swiglu_kernel") == "experts"
    assert profile_step.category("nvjet_sm90_tst_256x152_64x4_2x1_v_bz_coopA_TNT") == "gemm"


def test_exchange_times():
    kernels = [
        (0, 100, "_gate_up_swiglu_kernel"),
        (90, 130, "ncclDevKernel_SendRecv"),  # ulysses range [80, 140): 40 us of NCCL, 10 of them under compute
        (120, 125, "void at::native::elementwise_kernel"),  # covers 5 more us of it
        (200, 260, "ncclDevKernel_SendRecv"),  # outside every ulysses range: the MoE's all-to-all
        (300, 320, "ncclDevKernel_SendRecv"),  # half inside the second ulysses range [310, 400)
    ]
    annotations = [(80, 140, "ulysses_all_to_all"), (310, 400, "ulysses_all_to_all"), (0, 400, "nccl:all_to_all")]
    out = profile_step.exchange_times(annotations, kernels)
    assert set(out) == {"ulysses_all_to_all", "all NCCL"}
    assert out["all NCCL"]["kernel_ms"] == pytest.approx(0.120)  # 40 + 60 + 20 us
    assert out["all NCCL"]["exposed_ms"] == pytest.approx(0.105)  # 120 - 10 under the experts - 5 under the add
    assert out["ulysses_all_to_all"]["kernel_ms"] == pytest.approx(0.050)  # 40 + 10 us
    assert out["ulysses_all_to_all"]["exposed_ms"] == pytest.approx(0.035)  # 50 - 10 under the experts - 5 under the add
    assert out["ulysses_all_to_all"]["ranges"] == 2
