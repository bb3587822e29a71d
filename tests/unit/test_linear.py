"""Replicated / column / row parallel linear layers over 2 gloo ranks equal the full layer."""

import pytest
import torch

from omni_ep.config import ParallelConfig
from omni_ep.distributed import destroy_parallel_state, init_parallel_state
from omni_ep.layers.linear import ColumnParallelLinear, ReplicatedLinear, RowParallelLinear
from tests.launcher import run_ranks


def linear_worker(rank, world_size):
    init_parallel_state(ParallelConfig(tensor_parallel_size=world_size))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 8, generator=g)
    w1, b1 = torch.randn(12, 8, generator=g), torch.randn(12, generator=g)
    w2, b2 = torch.randn(8, 12, generator=g), torch.randn(8, generator=g)
    col = ColumnParallelLinear(8, 12, bias=True)
    row = RowParallelLinear(12, 8, bias=True)
    col.weight_loader(col.weight, w1), col.weight_loader(col.bias, b1)
    row.weight_loader(row.weight, w2), row.weight_loader(row.bias, b2)
    assert col.weight.shape == (12 // world_size, 8) and row.weight.shape == (8, 12 // world_size)
    assert col.weight.checkpoint_slice((12, 8)) == (slice(6 * rank, 6 * rank + 6), slice(None))
    h, _ = col(x)
    y, _ = row(h)
    ref = (x @ w1.T + b1) @ w2.T + b2
    full_col = ColumnParallelLinear(8, 12, gather_output=True)
    full_col.weight_loader(full_col.weight, w1)
    gathered, _ = full_col(x)
    assert torch.allclose(gathered, x @ w1.T, atol=1e-5)
    router = ReplicatedLinear(8, 4, params_dtype=torch.float32)
    router.weight_loader(router.weight, w1[:4])
    logits, _ = router(x.to(torch.bfloat16))
    assert logits.dtype == torch.float32
    destroy_parallel_state()
    return (y - ref).abs().max().item()


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_column_then_row_parallel_equals_full_layer():
    errs = run_ranks(linear_worker, 2, timeout=150)
    assert max(errs) < 1e-5, errs


def test_wrong_checkpoint_shape_names_the_layer():
    init_parallel_state(ParallelConfig())
    try:
        layer = ColumnParallelLinear(8, 12, prefix="model.layers.0.self_attn.qkv_proj")
        with pytest.raises(ValueError, match="qkv_proj: checkpoint shape \\(12, 9\\) does not match"):
            layer.weight_loader(layer.weight, torch.zeros(12, 9))
    finally:
        destroy_parallel_state()
