import pytest
import torch

from omni_ep.models.hunyuan_image3.attention_mask import build_attention_mask

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
