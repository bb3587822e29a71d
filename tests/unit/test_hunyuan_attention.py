"""Attention of HunyuanImage-3.0: the grouped-per-KV-head qkv split, RoPE before QK-norm in fp32, the KV cache."""

import math

import pytest
import torch

from omni_ep.models.hunyuan_image3.attention import HunyuanImage3Attention, HunyuanImage3KVCache
from omni_ep.models.hunyuan_image3.attention_mask import attention_segments
from omni_ep.models.hunyuan_image3.make_tiny_checkpoint import tiny_config
from omni_ep.models.hunyuan_image3.rope import rope_cos_sin
from tests.unit.hunyuan_reference import ensure_single_process_state

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def attention():
    ensure_single_process_state()
    torch.manual_seed(0)
    attn = HunyuanImage3Attention(tiny_config(), layer_idx=0, params_dtype=torch.float32)
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0, 0.2)
    return attn


def test_qkv_rows_are_grouped_per_kv_head(attention):
    """4 heads, 2 KV heads, D 16: rows of KV group g are [q_2g, q_2g+1, k_g, v_g], 16 rows each."""
    D = 16
    # Mark each row with (block number * 100 + position in block) so the split can be read off.
    qkv = torch.tensor([[[b * 100 + r for b in range(8) for r in range(D)]]], dtype=torch.float32)
    q, k, v = attention.split_qkv(qkv)
    assert q.shape == (1, 4, 1, D) and k.shape == (1, 2, 1, D) and v.shape == (1, 2, 1, D)
    blocks = lambda t: [int(t[0, h, 0, 0].item()) // 100 for h in range(t.shape[1])]  # noqa: E731
    assert blocks(q) == [0, 1, 4, 5]  # q heads 0,1 in group 0 (blocks 0,1); heads 2,3 in group 1 (blocks 4,5)
    assert blocks(k) == [2, 6]
    assert blocks(v) == [3, 7]
    assert torch.equal(q[0, 3, 0], torch.arange(D) + 500.0)


def test_rope_then_qk_norm_then_sdpa(attention):
    """Against a hand computation: q, k rotated in fp32, THEN RMS-normalised, softmax over the allowed keys."""
    torch.manual_seed(1)
    B, S, H, D = 1, 5, 64, 16
    x = torch.randn(B, S, H)
    pos = torch.tensor([0, 1, 2, 7, 9])
    cos, sin = rope_cos_sin(pos, pos.flip(0), D)
    mask = torch.tril(torch.ones(S, S, dtype=torch.bool))
    out = attention(x, cos, sin, attention_segments(S, []))

    qkv = x @ attention.qkv_proj.weight.T
    q, k, v = attention.split_qkv(qkv)

    def rot(t):
        t1, t2 = t[..., : D // 2], t[..., D // 2 :]
        return t * cos + torch.cat([-t2, t1], -1) * sin

    def norm(t, w):
        return w * t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + 1e-5)

    q = norm(rot(q), attention.query_layernorm.weight)
    k = norm(rot(k), attention.key_layernorm.weight)
    heads = []
    for h in range(4):
        scores = q[0, h] @ k[0, h // 2].T / math.sqrt(D)
        heads.append(torch.softmax(scores.masked_fill(~mask, -torch.inf), -1) @ v[0, h // 2])
    want = torch.cat(heads, -1) @ attention.o_proj.weight.T
    torch.testing.assert_close(out[0], want, rtol=1e-5, atol=1e-5)

    # Normalising BEFORE the rotation gives a different result (RMSNorm with a non-uniform weight does not
    # commute with the rotation), so the order is really checked.
    q_wrong = rot(norm(attention.split_qkv(qkv)[0], attention.query_layernorm.weight))
    assert (q_wrong - q).abs().max() > 1e-3


def test_kv_cache_stores_the_prefix_then_prepends_it():
    cache = HunyuanImage3KVCache()
    with pytest.raises(RuntimeError, match="begin_fill"):
        cache.store_or_extend(0, torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4))
    cache.begin_fill(prefix_len=3)
    assert not cache.is_filled
    k, v = torch.randn(2, 2, 5, 4), torch.randn(2, 2, 5, 4)
    assert cache.store_or_extend(0, k, v)[0] is k
    assert torch.equal(cache.keys[0], k[:, :, :3])
    assert cache.extended(1, 2, 4) is None  # layer 1 holds no prefix yet
    k2, v2 = torch.randn(2, 2, 2, 4), torch.randn(2, 2, 2, 4)
    cache.end_fill()
    assert cache.is_filled
    # The buffers a cached step writes its keys into: the prefix first, [B, S_kv, N_kv, D] memory.
    kx, vx = cache.extended(0, 2, 4)
    assert kx.shape == vx.shape == (2, 2, 7, 4) and kx.transpose(1, 2).is_contiguous()
    assert torch.equal(kx[:, :, :3], k[:, :, :3]) and torch.equal(vx[:, :, :3], v[:, :, :3])
    ek, ev = cache.store_or_extend(0, k2, v2)
    assert torch.equal(ek, torch.cat([k[:, :, :3], k2], 2)) and torch.equal(ev, torch.cat([v[:, :, :3], v2], 2))
    with pytest.raises(ValueError, match="batch"):
        cache.store_or_extend(0, k2[:1], v2[:1])
    cache.reset()
    assert not cache.is_filled and not cache.keys
