import pytest
import torch

import torch.nn.functional as F

from omni_ep.models.hunyuan_image3.attention import segmented_attention
from omni_ep.models.hunyuan_image3.attention_mask import attention_segments, build_attention_mask

pytestmark = pytest.mark.timeout(60)

# 2 text tokens, image block [2, 5), then 2 text tokens. Rows are queries, columns keys; 1 = attend.
EXPECTED_7 = [
    [1, 0, 0, 0, 0, 0, 0],
    [1, 1, 0, 0, 0, 0, 0],
    [1, 1, 1, 1, 1, 0, 0],
    [1, 1, 1, 1, 1, 0, 0],
    [1, 1, 1, 1, 1, 0, 0],
    [1, 1, 1, 1, 1, 1, 0],
    [1, 1, 1, 1, 1, 1, 1],
]


def test_small_layout():
    mask = build_attention_mask(7, [(2, 5)])
    assert mask.dtype == torch.bool and mask.shape == (7, 7)
    assert mask.int().tolist() == EXPECTED_7


def test_no_image_is_causal_and_two_blocks():
    assert torch.equal(build_attention_mask(5, []), torch.ones(5, 5, dtype=torch.bool).tril())
    mask = build_attention_mask(6, [(0, 2), (3, 5)])
    assert mask[0, 1] and mask[3, 4] and not mask[1, 3] and not mask[2, 3] and mask[4, 2]


def test_kv_cache_rows_are_a_suffix():
    mask = build_attention_mask(7, [(2, 5)], query_start=2)
    assert mask.shape == (5, 7)
    assert mask.int().tolist() == EXPECTED_7[2:]
    # Sequence truncated at the image end (the cached-step layout: <timestep> + image tokens as queries).
    mask = build_attention_mask(5, [(2, 5)], query_start=1)
    assert mask.int().tolist() == [row[:5] for row in EXPECTED_7[1:5]]


def test_bad_input():
    with pytest.raises(ValueError, match="end exclusive"):
        build_attention_mask(4, [(2, 6)])
    with pytest.raises(ValueError, match="query_start"):
        build_attention_mask(4, [], query_start=5)


def segments_as_mask(seq_len, segments, query_start):
    mask = torch.zeros(seq_len - query_start, seq_len, dtype=torch.bool)
    for seg in segments:
        for i in range(seg.q_start, seg.q_end):
            mask[i - query_start, : (i + 1 if seg.causal else seg.kv_end)] = True
    return mask


# (seq_len, image blocks, query_start): step 0, a cached step, text after the image, several text tokens between
# a cached prefix and the image (the Instruct template's extra slots), two blocks, no image.
LAYOUTS = [(7, [(2, 5)], 0), (7, [(2, 5)], 2), (5, [(2, 5)], 1), (12, [(5, 9)], 2), (9, [(0, 2), (3, 5)], 0),
           (9, [(0, 2), (3, 5)], 1), (6, [], 0), (6, [], 3)]


@pytest.mark.parametrize("seq_len, blocks, query_start", LAYOUTS)
def test_segments_cover_the_mask_exactly(seq_len, blocks, query_start):
    segments = attention_segments(seq_len, blocks, query_start)
    assert segments[0].q_start == query_start and segments[-1].q_end == seq_len
    assert all(a.q_end == b.q_start for a, b in zip(segments, segments[1:]))
    assert torch.equal(segments_as_mask(seq_len, segments, query_start), build_attention_mask(seq_len, blocks, query_start=query_start))


@pytest.mark.parametrize("seq_len, blocks, query_start", LAYOUTS)
def test_segmented_attention_equals_dense_masked_attention(seq_len, blocks, query_start):
    """GQA (4 query heads on 2 KV heads) without repeating K/V, one call per segment, against one SDPA call with
    repeated K/V and the dense mask."""
    g = torch.Generator().manual_seed(seq_len * 10 + query_start)
    q = torch.randn(2, 4, seq_len - query_start, 8, generator=g)
    k, v = torch.randn(2, 2, seq_len, 8, generator=g), torch.randn(2, 2, seq_len, 8, generator=g)
    mask = build_attention_mask(seq_len, blocks, query_start=query_start)
    expected = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=mask)
    out = segmented_attention(q, k, v, attention_segments(seq_len, blocks, query_start))
    torch.testing.assert_close(out, expected.transpose(1, 2), rtol=1e-5, atol=1e-6)
