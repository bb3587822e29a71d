"""Group construction for many layouts, without launching processes."""

import pytest

from omni_ep.config import ParallelConfig
from omni_ep.distributed.rank_groups import all_rank_groups, rank_coordinates, rank_groups


def layout(**kw):
    return ParallelConfig(enable_expert_parallel=True, **kw)


def test_tp2_cfg2_dp4_sixteen_ranks():
    groups = all_rank_groups(layout(tensor_parallel_size=2, cfg_parallel_size=2, data_parallel_size=4))
    assert groups["tp"] == [[2 * i, 2 * i + 1] for i in range(8)]
    assert groups["cfg"] == [[0, 2], [1, 3], [4, 6], [5, 7], [8, 10], [9, 11], [12, 14], [13, 15]]
    assert groups["dp"] == [[0, 4, 8, 12], [1, 5, 9, 13], [2, 6, 10, 14], [3, 7, 11, 15]]
    assert groups["ep"] == [list(range(16))]
    assert groups["pp"] == [[r] for r in range(16)]


def test_pp2_tp2_sp2_ep_is_per_stage():
    cfg = layout(tensor_parallel_size=2, ulysses_degree=2, pipeline_parallel_size=2)
    groups = all_rank_groups(cfg)
    assert groups["tp"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert groups["sp"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert groups["pp"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert groups["ep"] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert cfg.expert_parallel_size == 4


def test_pp2_with_cfg2_ep_is_orthogonal_not_contiguous():
    # The contiguous-range construction gets this wrong: stage 0 is not ranks 0..3.
    groups = all_rank_groups(layout(tensor_parallel_size=2, pipeline_parallel_size=2, cfg_parallel_size=2))
    assert groups["pp"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert groups["ep"] == [[0, 1, 4, 5], [2, 3, 6, 7]]


def test_ulysses_times_ring():
    groups = all_rank_groups(layout(ulysses_degree=2, ring_degree=2))
    assert groups["ulysses"] == [[0, 1], [2, 3]]
    assert groups["ring"] == [[0, 2], [1, 3]]
    assert groups["sp"] == [[0, 1, 2, 3]]


def test_expert_parallel_off_gives_singleton_ep_groups():
    cfg = ParallelConfig(tensor_parallel_size=2, data_parallel_size=2)
    assert cfg.expert_parallel_size == 1
    assert all_rank_groups(cfg)["ep"] == [[0], [1], [2], [3]]


LAYOUTS = [
    dict(),
    dict(tensor_parallel_size=2),
    dict(cfg_parallel_size=2),
    dict(data_parallel_size=2),
    dict(tensor_parallel_size=2, cfg_parallel_size=2),
    dict(tensor_parallel_size=4, cfg_parallel_size=2),
    dict(tensor_parallel_size=2, cfg_parallel_size=2, data_parallel_size=2),
    dict(tensor_parallel_size=2, cfg_parallel_size=2, data_parallel_size=4),
    dict(tensor_parallel_size=2, ulysses_degree=2, pipeline_parallel_size=2),
    dict(ulysses_degree=2, ring_degree=2, cfg_parallel_size=2),
    dict(tensor_parallel_size=2, ring_degree=3, pipeline_parallel_size=2, data_parallel_size=2),
    dict(pipeline_parallel_size=4, cfg_parallel_size=2),
    dict(tensor_parallel_size=8),
]


@pytest.mark.parametrize("kw", LAYOUTS, ids=lambda kw: "-".join(f"{k[:3]}{v}" for k, v in kw.items()) or "single")
def test_every_rank_in_exactly_one_group_of_each_kind(kw):
    cfg = layout(**kw)
    groups = all_rank_groups(cfg)
    world = cfg.world_size
    sizes = {"tp": cfg.tensor_parallel_size, "sp": cfg.sequence_parallel_size, "cfg": cfg.cfg_parallel_size,
             "dp": cfg.data_parallel_size, "pp": cfg.pipeline_parallel_size, "ep": cfg.expert_parallel_size,
             "ulysses": cfg.ulysses_degree, "ring": cfg.ring_degree, "world": world}
    for name, rank_lists in groups.items():
        flat = sorted(r for g in rank_lists for r in g)
        assert flat == list(range(world)), name
        assert all(len(g) == sizes[name] for g in rank_lists), name
    # EP members share the pipeline stage and nothing else is fixed.
    for g in groups["ep"]:
        stages = {rank_coordinates(r, {"tp": cfg.tensor_parallel_size, "ulysses": cfg.ulysses_degree,
                                       "ring": cfg.ring_degree, "pp": cfg.pipeline_parallel_size,
                                       "cfg": cfg.cfg_parallel_size, "dp": cfg.data_parallel_size})["pp"] for r in g}
        assert len(stages) == 1
    # A TP group and an EP group meet in exactly the TP group (TP nests inside EP).
    for tp in groups["tp"]:
        assert any(set(tp) <= set(ep) for ep in groups["ep"])


def test_unknown_dimension_is_refused():
    with pytest.raises(ValueError, match="unknown layout dimension"):
        rank_groups({"tp": 2}, ("xp",))


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(tensor_parallel_size=0), "tensor_parallel_size must be an integer >= 1"),
        (dict(cfg_parallel_size=3), "cfg_parallel_size must be 1 or 2"),
        (dict(all2all_backend="deepep"), "unknown all2all_backend 'deepep'"),
        (dict(expert_placement="random"), "unknown expert_placement 'random'"),
        (dict(expert_placement="balanced"), '"balanced" needs expert_loads'),
        (dict(expert_loads="loads.json"), "expert_loads needs expert_placement"),
    ],
)
def test_bad_config_says_what_to_change(kw, match):
    with pytest.raises(ValueError, match=match):
        ParallelConfig(**kw)


def test_world_size_mismatch_message():
    with pytest.raises(ValueError, match="needs 4 processes .* but 2 were launched"):
        ParallelConfig(tensor_parallel_size=2, cfg_parallel_size=2).check_world_size(2)


def test_row_chunks_cover_every_row_once():
    from omni_ep.distributed.row_chunks import row_chunk

    assert [row_chunk(10, r, 4) for r in range(4)] == [(0, 3), (3, 6), (6, 8), (8, 10)]
    assert [row_chunk(1, r, 2) for r in range(2)] == [(0, 1), (1, 1)]
    assert [row_chunk(0, r, 2) for r in range(2)] == [(0, 0), (0, 0)]
