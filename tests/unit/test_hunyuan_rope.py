import math

import pytest
import torch

from omni_ep.models.hunyuan_image3.rope import apply_rotary_emb, image_rope_positions, rope_cos_sin, rope_positions

pytestmark = pytest.mark.timeout(60)


def test_positions_2x3_image_after_5_text_tokens():
    # L=5, h=2, w=3: y0 = 5 + (6-2)/2 = 7, x0 = trunc(5 + (6-3)/2) = trunc(6.5) = 6; text resumes at 11.
    pos_y, pos_x = image_rope_positions(13, image_start=5, height=2, width=3)
    assert pos_y.tolist() == [0, 1, 2, 3, 4, 7, 7, 7, 8, 8, 8, 11, 12]
    assert pos_x.tolist() == [0, 1, 2, 3, 4, 6, 7, 8, 6, 7, 8, 11, 12]
    assert pos_y.dtype == torch.int64


def test_positions_two_images_and_1x1():
    # block A at 1: 1x1 -> y = x = 1; block B at 3: 3x2 (L=3, hw=6): y0 = 3 + 3/2 -> 4, x0 = 3 + 2 = 5.
    pos_y, pos_x = rope_positions(10, [(3, 3, 2), (1, 1, 1)])
    assert pos_y.tolist() == [0, 1, 2, 4, 4, 5, 5, 6, 6, 9]
    assert pos_x.tolist() == [0, 1, 2, 5, 6, 5, 6, 5, 6, 9]


def test_positions_reject_overlap_and_overflow():
    with pytest.raises(ValueError, match="overlaps"):
        rope_positions(20, [(2, 2, 2), (4, 1, 1)])
    with pytest.raises(ValueError, match="seq_len"):
        rope_positions(8, [(5, 2, 2)])


def test_cos_sin_known_numbers():
    # head_dim 8: freq_j = 10000^(-2j/8) = 1, 0.1, 0.01, 0.001; even j take y, odd j take x.
    cos, sin = rope_cos_sin(torch.tensor([0, 7]), torch.tensor([0, 6]), head_dim=8)
    assert cos.shape == (2, 8) and cos.dtype == torch.float32
    angles = [7 * 1.0, 6 * 0.1, 7 * 0.01, 6 * 0.001]
    expect_cos = torch.tensor([math.cos(a) for a in angles] * 2)
    expect_sin = torch.tensor([math.sin(a) for a in angles] * 2)
    torch.testing.assert_close(cos[1], expect_cos, rtol=0, atol=1e-6)
    torch.testing.assert_close(sin[1], expect_sin, rtol=0, atol=1e-6)
    torch.testing.assert_close(cos[0], torch.ones(8))
    torch.testing.assert_close(sin[0], torch.zeros(8))


def test_cos_sin_real_head_dim_frequency():
    cos, sin = rope_cos_sin(torch.tensor([3]), torch.tensor([5]), head_dim=128)
    # j = 63 (odd -> x = 5): freq 10000^(-126/128); columns 63 and 127 hold the same angle.
    angle = 5 * 10000.0 ** (-126 / 128)
    assert cos.shape == (1, 128)
    assert abs(sin[0, 63].item() - math.sin(angle)) < 1e-7
    assert abs(sin[0, 127].item() - math.sin(angle)) < 1e-7
    assert abs(cos[0, 2].item() - math.cos(3 * 10000.0 ** (-4 / 128))) < 1e-6


def test_rotate_pairs_d_with_d_plus_half():
    # D=4: dims (0, 2) rotate by angle of j=0 (y), dims (1, 3) by j=1 (x, freq 0.01).
    cos, sin = rope_cos_sin(torch.tensor([2]), torch.tensor([100]), head_dim=4)
    x = torch.tensor([1.0, 0.0, 0.0, 2.0]).view(1, 1, 1, 4)
    out = apply_rotary_emb(x, cos, sin).view(4)
    a, b = 2.0, 100 * 0.01
    expect = torch.tensor([math.cos(a), -2 * math.sin(b), math.sin(a), 2 * math.cos(b)])
    torch.testing.assert_close(out, expect, rtol=0, atol=1e-6)


def test_apply_is_fp32_and_relative_for_text():
    torch.manual_seed(0)
    q = torch.randn(2, 3, 6, 16).bfloat16()
    pos = torch.arange(6)
    cos, sin = rope_cos_sin(pos, pos, head_dim=16)
    out = apply_rotary_emb(q, cos, sin)
    assert out.shape == q.shape and out.dtype == torch.float32
    # Rotations keep norms; for text (y = x = n) scores depend only on the position difference.
    torch.testing.assert_close(out.norm(dim=-1), q.float().norm(dim=-1), rtol=1e-5, atol=1e-5)
    v = torch.randn(16)
    k = torch.randn(16)
    rq = apply_rotary_emb(v.expand(1, 1, 6, 16), cos, sin)[0, 0]
    rk = apply_rotary_emb(k.expand(1, 1, 6, 16), cos, sin)[0, 0]
    torch.testing.assert_close(rq[3] @ rk[1], rq[5] @ rk[3], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(rq[3] @ rk[1], rq[3] @ rk[2], atol=1e-3)


def test_apply_batched_tables_and_errors():
    cos, sin = rope_cos_sin(torch.arange(10).view(2, 5), torch.arange(10).view(2, 5), head_dim=8)
    x = torch.randn(2, 4, 5, 8)
    out = apply_rotary_emb(x, cos, sin)
    single_cos, single_sin = rope_cos_sin(torch.arange(5, 10), torch.arange(5, 10), head_dim=8)
    torch.testing.assert_close(out[1], apply_rotary_emb(x[1:2], single_cos, single_sin)[0])
    with pytest.raises(ValueError, match="divisible by 4"):
        rope_cos_sin(torch.arange(3), torch.arange(3), head_dim=6)
    with pytest.raises(ValueError, match="does not match"):
        apply_rotary_emb(torch.randn(1, 1, 4, 8), cos[0], sin[0])
