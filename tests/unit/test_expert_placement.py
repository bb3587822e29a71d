"""Expert placements: the balanced split by recorded loads (hand-checked and on random loads), and the
expert-loads file's errors. The multi-rank forward with each placement is in test_fused_moe_ep.py."""

import json
import random

import pytest

from omni_ep.layers.fused_moe.expert_loads import FORMAT, read_layer_loads, write_expert_loads
from omni_ep.layers.fused_moe.expert_placement import balanced_experts_per_rank, experts_per_rank, pacing_ratio

# 8 experts, 2 ranks: the greedy split ends at 2223 / 1937 rows ([0, 5, 6, 7] / [1, 2, 3, 4]), the swaps at
# 2103 / 2057; an even split would be 2080 / 2080, the linear one is 1783 / 2377.
LOADS_8 = [316, 577, 510, 380, 470, 1068, 500, 339]


def test_balanced_split_by_hand():
    held = balanced_experts_per_rank(LOADS_8, 2)
    assert held == [[0, 3, 5, 7], [1, 2, 4, 6]]
    assert [sum(LOADS_8[e] for e in ids) for ids in held] == [2103, 2057]
    assert pacing_ratio([LOADS_8], 2, "balanced") == pytest.approx(2103 / 2080)
    assert pacing_ratio([LOADS_8], 2, "linear") == pytest.approx(2377 / 2080)
    # Equal loads: ties go to the lower id and the lower rank, so the split is the round-robin one.
    assert balanced_experts_per_rank([5] * 8, 4) == experts_per_rank(8, 4, "round_robin")


@pytest.mark.parametrize("ep_size", [2, 4, 8])
def test_balanced_split_of_random_loads(ep_size):
    rng = random.Random(ep_size)
    loads_LE = [[int(rng.lognormvariate(6, 0.6)) for _ in range(64)] for _ in range(8)]
    for loads in loads_LE:
        held = balanced_experts_per_rank(loads, ep_size)
        assert sorted(e for ids in held for e in ids) == list(range(64))
        assert all(len(ids) == 64 // ep_size and ids == sorted(ids) for ids in held)
        assert held == balanced_experts_per_rank(list(loads), ep_size)  # a pure function: every rank agrees
    balanced = pacing_ratio(loads_LE, ep_size, "balanced")
    assert balanced < min(pacing_ratio(loads_LE, ep_size, p) for p in ("linear", "round_robin"))
    assert balanced < 1.02  # 8 experts a rank at EP 8: a few percent is what the granularity leaves


def test_placement_and_loads_go_together():
    with pytest.raises(ValueError, match='needed by placement "balanced", and by it only'):
        experts_per_rank(8, 2, "balanced")
    with pytest.raises(ValueError, match='needed by placement "balanced", and by it only'):
        experts_per_rank(8, 2, "linear", LOADS_8)
    with pytest.raises(ValueError, match="cannot be split evenly"):
        balanced_experts_per_rank(LOADS_8[:6], 4)


def test_loads_file_round_trip(tmp_path):
    path = tmp_path / "loads.json"
    write_expert_loads(path, {"model.layers.0.mlp.experts": LOADS_8}, prompt="a cat")
    assert read_layer_loads(path, "model.layers.0.mlp.experts", 8) == LOADS_8
    assert json.loads(path.read_text())["meta"] == {"prompt": "a cat"}
    with pytest.raises(ValueError, match="same number of experts"):
        write_expert_loads(path, {"a": LOADS_8, "b": LOADS_8[:4]})


@pytest.mark.parametrize(
    "content, match",
    [
        (None, "cannot read the expert loads"),
        ("{not json", "cannot read the expert loads"),
        (dict(layers={}), "is not an expert-loads file"),
        (dict(format=FORMAT, layers={"model.layers.1.mlp.experts": LOADS_8}), "has no loads for layer"),
        (dict(format=FORMAT, layers={"model.layers.0.mlp.experts": LOADS_8[:7]}), "needs 8 loads"),
        (dict(format=FORMAT, layers={"model.layers.0.mlp.experts": [-1] + LOADS_8[1:]}), "non-negative integer"),
        (dict(format=FORMAT, layers={"model.layers.0.mlp.experts": [True] + LOADS_8[1:]}), "non-negative integer"),
        (dict(format=FORMAT, layers={"model.layers.0.mlp.experts": 8}), "needs a list"),
        (dict(format=FORMAT, layers={"model.layers.0.mlp.experts": LOADS_8, "x": LOADS_8[:4]}), "different numbers"),
    ],
    ids=["missing", "not-json", "no-format", "other-layer", "short", "negative", "bool", "not-a-list", "mixed"],
)
def test_bad_loads_file_says_what_is_wrong(tmp_path, content, match):
    path = tmp_path / "loads.json"
    if content is not None:
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(ValueError, match=match):
        read_layer_loads(path, "model.layers.0.mlp.experts", 8)
