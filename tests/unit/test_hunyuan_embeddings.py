import math

import pytest
import torch
import torch.nn.functional as F

from omni_ep.models.hunyuan_image3.embeddings import (
    HunyuanResBlock,
    HunyuanTimestepEmbedder,
    HunyuanUNetDown,
    HunyuanUNetUp,
    timestep_sinusoids,
)

pytestmark = pytest.mark.timeout(60)


def _identity_conv3x3_(conv: torch.nn.Conv2d) -> None:
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.zero_()
        for c in range(min(conv.in_channels, conv.out_channels)):
            conv.weight[c, c, 1, 1] = 1.0


def _skip_only_(block: HunyuanResBlock, gains: list[float]) -> None:
    """Zero the residual branch; skip maps input channel c to output channel 32*g + c with gain gains[g]."""
    with torch.no_grad():
        for p in block.out_layers[3].parameters():
            p.zero_()
        skip = block.skip_connection
        skip.bias.zero_()
        skip.weight.zero_()
        for g, gain in enumerate(gains):
            for c in range(32):
                skip.weight[32 * g + c, c, 0, 0] = gain


def test_sinusoids_known_numbers():
    # dim 4: half 2, freqs = 10000^(-0/2), 10000^(-1/2) = 1, 0.01; order [cos | sin].
    emb = timestep_sinusoids(torch.tensor([0.0, 500.0]), dim=4)
    expect = torch.tensor([[1.0, 1.0, 0.0, 0.0], [math.cos(500), math.cos(5), math.sin(500), math.sin(5)]])
    torch.testing.assert_close(emb, expect, rtol=0, atol=1e-5)


def test_timestep_embedder_formula_and_keys():
    torch.manual_seed(0)
    emb = HunyuanTimestepEmbedder(64)
    shapes = {k: tuple(v.shape) for k, v in emb.state_dict().items()}
    assert shapes == {"mlp.0.weight": (64, 256), "mlp.0.bias": (64,), "mlp.2.weight": (64, 64), "mlp.2.bias": (64,)}
    t = torch.tensor([1000.0, 937.5, 3.0])
    half = torch.arange(128, dtype=torch.float64)
    args = t.double()[:, None] * torch.exp(-math.log(10000.0) * half / 128)
    f = torch.cat([args.cos(), args.sin()], dim=-1)
    w1, b1, w2, b2 = (p.double() for p in (emb.mlp[0].weight, emb.mlp[0].bias, emb.mlp[2].weight, emb.mlp[2].bias))
    a = f @ w1.T + b1
    expect = (0.5 * a * (1 + torch.erf(a / math.sqrt(2)))) @ w2.T + b2  # exact (erf) GELU
    torch.testing.assert_close(emb(t).double(), expect, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="1-D"):
        emb(t[:, None])


def test_real_config_keys_and_shapes():
    with torch.device("meta"):
        down = HunyuanUNetDown(32, 4096, 1024, 4096)
        up = HunyuanUNetUp(4096, 4096, 1024, 32)
    down_shapes = {k: tuple(v.shape) for k, v in down.state_dict().items()}
    assert down_shapes == {
        "model.0.weight": (1024, 32, 3, 3), "model.0.bias": (1024,),
        "model.1.in_layers.0.weight": (1024,), "model.1.in_layers.0.bias": (1024,),
        "model.1.in_layers.2.weight": (4096, 1024, 3, 3), "model.1.in_layers.2.bias": (4096,),
        "model.1.emb_layers.1.weight": (8192, 4096), "model.1.emb_layers.1.bias": (8192,),
        "model.1.out_layers.0.weight": (4096,), "model.1.out_layers.0.bias": (4096,),
        "model.1.out_layers.3.weight": (4096, 4096, 3, 3), "model.1.out_layers.3.bias": (4096,),
        "model.1.skip_connection.weight": (4096, 1024, 1, 1), "model.1.skip_connection.bias": (4096,),
    }  # fmt: skip
    up_shapes = {k: tuple(v.shape) for k, v in up.state_dict().items()}
    assert up_shapes == {
        "model.0.in_layers.0.weight": (4096,), "model.0.in_layers.0.bias": (4096,),
        "model.0.in_layers.2.weight": (1024, 4096, 3, 3), "model.0.in_layers.2.bias": (1024,),
        "model.0.emb_layers.1.weight": (2048, 4096), "model.0.emb_layers.1.bias": (2048,),
        "model.0.out_layers.0.weight": (1024,), "model.0.out_layers.0.bias": (1024,),
        "model.0.out_layers.3.weight": (1024, 1024, 3, 3), "model.0.out_layers.3.bias": (1024,),
        "model.0.skip_connection.weight": (1024, 4096, 1, 1), "model.0.skip_connection.bias": (1024,),
        "model.1.0.weight": (1024,), "model.1.0.bias": (1024,),
        "model.1.2.weight": (32, 1024, 3, 3), "model.1.2.bias": (32,),
    }  # fmt: skip
    groupnorms = [m for m in [*down.modules(), *up.modules()] if isinstance(m, torch.nn.GroupNorm)]
    assert len(groupnorms) == 5 and all(m.num_groups == 32 and m.eps == 1e-5 for m in groupnorms)


def test_resblock_scale_then_shift():
    # Identity convs and identity skip: out = x + SiLU(GN(SiLU(GN(x))) * (1 + scale) + shift).
    torch.manual_seed(0)
    block = HunyuanResBlock(32, 8, 32)
    _identity_conv3x3_(block.in_layers[2])
    _identity_conv3x3_(block.out_layers[3])
    with torch.no_grad():
        block.emb_layers[1].weight.zero_()
        block.emb_layers[1].bias.copy_(torch.cat([torch.full((32,), 1.0), torch.full((32,), 0.5)]))
    x = torch.randn(2, 32, 3, 4)
    out = block(x, torch.randn(2, 8))
    h = F.silu(F.group_norm(x, 32, eps=1e-5))
    expect = x + F.silu(F.group_norm(h, 32, eps=1e-5) * 2.0 + 0.5)
    torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-5)


def test_unet_down_flattens_row_major_through_skip():
    # model.0 identity, residual branch zeroed, skip = [I; 2I]: token r*w + c = [x[:, r, c], 2 x[:, r, c]].
    down = HunyuanUNetDown(in_channels=32, emb_channels=16, hidden_channels=32, out_channels=64)
    _identity_conv3x3_(down.model[0])
    _skip_only_(down.model[1], [1.0, 2.0])
    x = torch.randn(2, 32, 3, 5)
    tokens = down(x, torch.randn(2, 16))
    assert tokens.shape == (2, 15, 64)
    for r in range(3):
        for c in range(5):
            torch.testing.assert_close(tokens[:, r * 5 + c], torch.cat([x[:, :, r, c], 2 * x[:, :, r, c]], dim=1))


def test_unet_up_unflattens_row_major():
    # ResBlock passes the first 32 of 64 channels through its skip; the head is GN -> SiLU -> identity conv.
    up = HunyuanUNetUp(in_channels=64, emb_channels=16, hidden_channels=32, out_channels=32)
    _identity_conv3x3_(up.model[1][2])
    _skip_only_(up.model[0], [1.0])
    hidden = torch.randn(2, 6, 64)
    out = up(hidden, torch.randn(2, 16), height=2, width=3)
    assert out.shape == (2, 32, 2, 3)
    grid = torch.empty(2, 32, 2, 3)
    for r in range(2):
        for c in range(3):
            grid[:, :, r, c] = hidden[:, r * 3 + c, :32]
    torch.testing.assert_close(out, F.silu(F.group_norm(grid, 32, eps=1e-5)), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="needs 9"):
        up(hidden, torch.randn(2, 16), height=3, width=3)


def test_group_norm_widths_must_be_multiples_of_32():
    with pytest.raises(ValueError, match="multiple of 32"):
        HunyuanUNetDown(32, 64, hidden_channels=48, out_channels=64)
