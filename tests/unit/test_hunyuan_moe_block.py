"""The MoE block: [up; gate] with silu on the second half, fp32 router (softmax over all, top-k, renormalise),
the shared MLP always added; checked with hand-set numbers and against a dense per-token loop."""

import pytest
import torch
import torch.nn.functional as F

from omni_ep.models.hunyuan_image3.make_tiny_checkpoint import tiny_config
from omni_ep.models.hunyuan_image3.moe import HunyuanImage3MoE, HunyuanImage3SharedMLP
from tests.unit.hunyuan_reference import ensure_single_process_state, moe_dense

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(autouse=True)
def _state():
    ensure_single_process_state()


def test_shared_mlp_applies_silu_to_the_second_half():
    mlp = HunyuanImage3SharedMLP(hidden_size=1, intermediate_size=1, params_dtype=torch.float32)
    with torch.no_grad():
        mlp.gate_and_up_proj.weight.copy_(torch.tensor([[2.0], [3.0]]))  # rows: up = 2x, gate = 3x
        mlp.down_proj.weight.fill_(1.0)
    x = torch.tensor([[1.0]])
    # [up; gate]: 2 * silu(3) = 5.7154...; the [gate; up] reading would give 3 * silu(2) = 5.2842...
    torch.testing.assert_close(mlp(x), torch.tensor([[2.0 * F.silu(torch.tensor(3.0)).item()]]))
    assert abs(mlp(x).item() - 5.71544) < 1e-4


def _checkpoint_style_weights(block, config, layer, seed=0):
    """Random weights put in through the loaders, keyed by checkpoint name (experts stored [up; gate])."""
    gen = torch.Generator().manual_seed(seed)
    H, I, E = config.hidden_size, config.moe_intermediate_size_at(layer), config.num_experts
    prefix = f"model.layers.{layer}.mlp"
    W = {
        f"{prefix}.gate.wg.weight": torch.randn(E, H, generator=gen),
        f"{prefix}.shared_mlp.gate_and_up_proj.weight": torch.randn(2 * I, H, generator=gen) / H**0.5,
        f"{prefix}.shared_mlp.down_proj.weight": torch.randn(H, I, generator=gen) / I**0.5,
    }
    for e in range(E):
        W[f"{prefix}.experts.{e}.gate_and_up_proj.weight"] = torch.randn(2 * I, H, generator=gen) / H**0.5
        W[f"{prefix}.experts.{e}.down_proj.weight"] = torch.randn(H, I, generator=gen) / I**0.5
    with torch.no_grad():
        block.gate.wg.weight.copy_(W[f"{prefix}.gate.wg.weight"])
        block.shared_mlp.gate_and_up_proj.weight.copy_(W[f"{prefix}.shared_mlp.gate_and_up_proj.weight"])
        block.shared_mlp.down_proj.weight.copy_(W[f"{prefix}.shared_mlp.down_proj.weight"])
        for e in range(E):
            name = f"{prefix}.experts.{e}"
            block.experts.weight_loader(block.experts.w13_weight, W[f"{name}.gate_and_up_proj.weight"], name, "w13", e)
            block.experts.weight_loader(block.experts.w2_weight, W[f"{name}.down_proj.weight"], name, "w2", e)
    return W


def test_moe_block_matches_a_dense_per_token_loop():
    config = tiny_config()
    block = HunyuanImage3MoE(config, layer_idx=1, params_dtype=torch.float32, prefix="model.layers.1.mlp")
    W = _checkpoint_style_weights(block, config, layer=1)
    x = torch.randn(2, 7, config.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = block(x)
    want = moe_dense(x.reshape(14, -1), W, "model.layers.1.mlp", config.to_dict(), 1).reshape(2, 7, -1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # The shared MLP is really in there: without it the result differs by exactly its output.
    shared = block.shared_mlp(x.reshape(14, -1)).reshape(2, 7, -1)
    assert shared.abs().max() > 1e-2
    with torch.no_grad():
        routed = block.experts(x.reshape(14, -1), block.gate(x.reshape(14, -1))).reshape(2, 7, -1)
    torch.testing.assert_close(routed + shared, got, rtol=1e-5, atol=1e-5)


def test_router_is_fp32_with_bf16_activations_and_renormalises():
    config = tiny_config(top_k=2)
    block = HunyuanImage3MoE(config, layer_idx=0, params_dtype=torch.bfloat16, prefix="model.layers.0.mlp")
    assert block.gate.wg.weight.dtype == torch.float32
    with torch.no_grad():
        block.gate.wg.weight.zero_()
        # Token 0 prefers experts 3 (logit 2) and 5 (logit 1): renormalised top-2 weights are
        # e^2 / (e^2 + e) = 0.7311 and 0.2689 (the softmax over all 8 experts would give 0.5466, 0.2011).
        block.gate.wg.weight[3, 0] = 2.0
        block.gate.wg.weight[5, 0] = 1.0
    x = torch.zeros(1, config.hidden_size, dtype=torch.bfloat16)
    x[0, 0] = 1.0
    logits = block.gate(x)
    assert logits.dtype == torch.float32
    from omni_ep.layers.fused_moe.router import select_experts

    weights, ids = select_experts(logits, 2, renormalize=config.norm_topk_prob)
    assert ids[0].tolist() == [3, 5]
    torch.testing.assert_close(weights[0], torch.tensor([0.7311, 0.2689]), atol=1e-4, rtol=0)
