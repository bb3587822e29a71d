"""Expert-parallel FusedMoE over spawned gloo ranks vs the single-process layer, on every rank, fp32.

One spawn per world size; inside it every layout x backend x placement x routing case runs in turn
(the default process group is reused, the parallel state rebuilt per layout), to keep the suite fast.
"""

import os
import tempfile

import pytest
import torch

from omni_ep.config import ParallelConfig
from omni_ep.distributed import destroy_parallel_state, get_tp_group, init_parallel_state
from omni_ep.distributed.row_chunks import row_chunk
from omni_ep.forward_context import set_forward_context
from omni_ep.layers.fused_moe import FusedMoE, select_experts
from omni_ep.layers.fused_moe.expert_loads import record_expert_loads, write_expert_loads
from omni_ep.layers.fused_moe.expert_placement import balanced_experts_per_rank
from omni_ep.layers.fused_moe.experts.torch_experts import TorchExperts
from omni_ep.layers.fused_moe.fp8 import FP8_DTYPE, quantize_rows
from tests.launcher import run_ranks

E, H, I = 8, 16, 12
RTOL = 1e-5


def full_weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    up_gate = torch.randn(E, 2 * I, H, generator=g) / H**0.5  # checkpoint layout: [up; gate]
    down = torch.randn(E, H, I, generator=g) / I**0.5
    return up_gate, down


def reference(x, logits, top_k, quantization=None):
    """The single-process layer: all experts local, [up; gate] reordered to [gate; up]; "fp8": each weight row
    quantized (fp8.py) as the loader does."""
    up_gate, down = full_weights()
    up, gate = up_gate.split(I, dim=1)
    w, ids = select_experts(logits, top_k)
    w13 = torch.cat([gate, up], dim=1)
    if quantization == "fp8":
        (w13, w13_scale), (down, down_scale) = quantize_rows(w13), quantize_rows(down)
        return TorchExperts().apply(x, ids, w, w13, down, w13_scale, down_scale)
    return TorchExperts().apply(x, ids, w, w13, down)


def tokens(case, data_rank, top_k):
    """Per-(data-)rank inputs: counts differ per rank and are odd; routing per case."""
    g = torch.Generator().manual_seed(100 + data_rank)
    T = {"random": 5 + 4 * data_rank, "one_expert": 7, "zero_on_rank1": 0 if data_rank == 1 else 9,
         "all_experts": 3 + data_rank}[case]
    x = torch.randn(T, H, generator=g)
    logits = torch.randn(T, E, generator=g)
    if case == "one_expert":
        logits[:, 3] += 50.0  # every token's first choice is expert 3
    return x, logits


def load_layer(layer):
    up_gate, down = full_weights()
    mapping = FusedMoE.make_expert_params_mapping(layer, "gate_and_up_proj", "down_proj", "gate_and_up_proj", E)
    assert sorted({expert_id for _, _, expert_id, _ in mapping}) == layer.local_expert_ids  # local experts only
    for param_name, weight_name, expert_id, shard_id in mapping:
        full = up_gate[expert_id] if shard_id == "w13" else down[expert_id]
        param = layer.get_parameter(f"{weight_name}weight".replace(weight_name, param_name).removeprefix("experts."))
        assert layer.weight_loader(param, full, weight_name, shard_id, expert_id)
    # Non-local experts are refused without copying.
    others = [e for e in range(E) if e not in layer.local_expert_ids]
    for e in others:
        assert not layer.weight_loader(layer.w2_weight, down[e], f"experts.{e}.down_proj.", "w2", e)


LAYOUTS = {
    2: [dict(tensor_parallel_size=2), dict(data_parallel_size=2), dict(cfg_parallel_size=2)],
    4: [dict(tensor_parallel_size=2, cfg_parallel_size=2), dict(data_parallel_size=4),
        dict(tensor_parallel_size=2, data_parallel_size=2)],
}
PLACEMENTS = ("linear", "round_robin", "balanced")
# Placements also run with FP8 experts (all2all only: the dispatch moves the same bf16 rows either way), against
# the quantized single process.
QUANTIZED = {"linear": "fp8"}
CASES = [("random", 2), ("one_expert", 1), ("one_expert", 2), ("zero_on_rank1", 2), ("all_experts", E)]


# Placement "balanced" by these loads (the layer's prefix is ""): neither blocks nor round robin on 2 or 4 ranks.
BALANCED_LOADS = [900, 10, 20, 30, 800, 700, 40, 50]


def ep_worker(rank, world_size):
    report = []
    loads_path = os.path.join(tempfile.mkdtemp(), "loads.json")
    write_expert_loads(loads_path, {"": BALANCED_LOADS, "other": BALANCED_LOADS[::-1]})
    for kw in LAYOUTS[world_size]:
        for backend in ("allgather_reducescatter", "all2all"):
            for placement in PLACEMENTS:
                loads = loads_path if placement == "balanced" else None
                cfg = ParallelConfig(enable_expert_parallel=True, all2all_backend=backend, expert_placement=placement,
                                     expert_loads=loads, **kw)
                state = init_parallel_state(cfg)
                data_rank = rank // cfg.tensor_parallel_size  # TP peers hold the same tokens
                # Linear placement: token counts asked from the ranks, router logits of every token. Round robin:
                # the token bound known from the forward context, logits of the rows this rank routes only.
                known_bound = placement == "round_robin"
                for case, top_k in CASES:
                    layer = FusedMoE(E, top_k, H, I, params_dtype=torch.float32)
                    load_layer(layer)
                    if placement == "balanced":
                        placed = balanced_experts_per_rank(BALANCED_LOADS, world_size)
                        assert layer.local_expert_ids == placed[layer.ep_rank]
                    x, logits = tokens(case, data_rank, top_k)
                    bound = max(tokens(case, d, top_k)[0].shape[0] for d in range(world_size // cfg.tensor_parallel_size))
                    start, end = layer.routed_rows(x.shape[0]) if known_bound else (0, x.shape[0])
                    rows = slice(*layer.routed_rows(x.shape[0]))
                    with set_forward_context(max_tokens_across_ep=bound if known_bound else None):
                        with record_expert_loads(layer) as recorded:
                            out = layer(x, logits[start:end])
                        # The routed rows alone, not joined over TP (the decoder layer's TP row chunks), with a
                        # shared expert.
                        out_rows = layer.forward_routed_rows(x[rows], logits[rows], shared_experts=torch.tanh)
                    ref = reference(x, logits, top_k)
                    torch.testing.assert_close(out_rows, ref[rows] + torch.tanh(x[rows]), rtol=RTOL, atol=1e-6)
                    # The recorded loads count forward's routing alone, every data rank's tokens once.
                    every_ids = torch.cat([select_experts(tokens(case, d, top_k)[1], top_k)[1].flatten()
                                           for d in range(world_size // cfg.tensor_parallel_size)])
                    assert recorded == {"": torch.bincount(every_ids, minlength=E).tolist()}, (kw, case)
                    err = ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item() if x.shape[0] else 0.0
                    assert out.shape == x.shape, (kw, backend, case)
                    assert err <= RTOL, f"{kw} {backend} {placement} {case} top{top_k}: rel err {err:.2e}"
                    report.append((str(kw), backend, placement, case, top_k, err))
                # Reduce-scatter into row chunks, every count from empty chunks to uneven ones: TP peers send
                # different multiples of the same rows; each keeps the sum of its own rows.
                tp = get_tp_group()
                for T in range(2 * tp.world_size + 2):
                    x = torch.arange(T * 3, dtype=torch.float32).reshape(T, 3)
                    start, end = row_chunk(T, tp.rank, tp.world_size)
                    summed = tp.reduce_scatter_row_chunks(x * (tp.rank + 1))
                    torch.testing.assert_close(summed, x[start:end] * (tp.world_size * (tp.world_size + 1) // 2),
                                               rtol=0, atol=0, msg=f"reduce_scatter_row_chunks of {T} rows")
                for case, top_k in CASES if placement in QUANTIZED and backend == "all2all" else ():
                    fp8_layer = FusedMoE(E, top_k, H, I, params_dtype=torch.float32, quantization=QUANTIZED[placement])
                    load_layer(fp8_layer)
                    assert fp8_layer.w13_weight.dtype == fp8_layer.w2_weight.dtype == FP8_DTYPE
                    x, logits = tokens(case, data_rank, top_k)
                    out = fp8_layer(x, logits)
                    ref = reference(x, logits, top_k, QUANTIZED[placement])
                    err = ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item() if x.shape[0] else 0.0
                    assert err <= RTOL, f"{kw} {backend} fp8 {case} top{top_k}: rel err {err:.2e}"
                    report.append((str(kw), backend, "fp8", case, top_k, err))
                # Expert bytes per rank are exactly total / EP.
                expert_bytes = sum(p.numel() * p.element_size() for p in (layer.w13_weight, layer.w2_weight))
                total = E * (2 * I * H + H * I) * 4
                assert expert_bytes * state.config.expert_parallel_size == total
                assert layer.local_num_experts == E // world_size
                # Logits of neither every token nor the routed rows: refused on every rank before any collective.
                x, logits = tokens("random", data_rank, 2)
                with pytest.raises(ValueError, match="routed_rows"):
                    layer(x, torch.cat([logits, logits[:1]]))  # T + 1 rows
                destroy_parallel_state()
    # Layers placed differently cannot share one expert mapping: the loader must ask per MoE block.
    init_parallel_state(ParallelConfig(enable_expert_parallel=True, data_parallel_size=world_size,
                                       expert_placement="balanced", expert_loads=loads_path))
    layers = torch.nn.ModuleList([FusedMoE(E, 2, H, I, prefix=p) for p in ("", "other")])
    with pytest.raises(ValueError, match="hold different experts on this rank"):
        FusedMoE.make_expert_params_mapping(layers, "gate_and_up_proj", "down_proj", "gate_and_up_proj", E)
    destroy_parallel_state()
    errors = {kind: bad_config_error(world_size, kind) for kind in BAD_CONFIGS[world_size]}
    return report, errors


def tp_worker(rank, world_size):
    """Expert parallel off, TP = world: every rank holds 1/TP of each expert's intermediate dim."""
    init_parallel_state(ParallelConfig(tensor_parallel_size=world_size))
    errs = []
    for case, top_k in CASES:
        layer = FusedMoE(E, top_k, H, I, params_dtype=torch.float32)
        load_layer(layer)
        assert layer.w13_weight.shape == (E, 2 * I // world_size, H)
        x, logits = tokens(case, 0, top_k)
        with record_expert_loads(layer) as recorded:
            out = layer(x, logits)
        # Every TP rank routed every token: the recorder counts them once.
        assert recorded == {"": torch.bincount(select_experts(logits, top_k)[1].flatten(), minlength=E).tolist()}
        ref = reference(x, logits, top_k)
        err = ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item() if x.shape[0] else 0.0
        assert err <= RTOL, f"TP{world_size} {case}: rel err {err:.2e}"
        errs.append(err)
        with pytest.raises(RuntimeError, match="needs expert parallel"):
            layer.forward_routed_rows(x, logits)
        # FP8: each rank quantizes its slice (w2's rows and h over I / TP only), so not the single process's
        # quantization: near the exact output, as far as FP8 goes.
        fp8_layer = FusedMoE(E, top_k, H, I, params_dtype=torch.float32, quantization="fp8")
        load_layer(fp8_layer)
        if x.shape[0]:
            fp8_err = ((fp8_layer(x, logits) - ref).norm() / ref.norm()).item()
            assert 1e-3 < fp8_err < 0.1, f"TP{world_size} fp8 {case}: rel err {fp8_err:.2e} from the exact output"
    destroy_parallel_state()
    return errs


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("world_size", [2, 4])
def test_expert_parallel_matches_single_process_on_every_rank(world_size):
    """Every layout x backend x placement x routing case against one process (and the loads recorded), then the bad configurations of
    this world size: each must fail on every rank with its message, before any collective (no hang)."""
    results = run_ranks(ep_worker, world_size, timeout=500)
    n = len(LAYOUTS[world_size]) * (2 * len(PLACEMENTS) + len(QUANTIZED)) * len(CASES)
    assert all(len(report) == n for report, _ in results)
    worst = max(row[-1] for report, _ in results for row in report)
    print(f"EP over {world_size} ranks: {n} cases per rank, worst relative error {worst:.2e}")
    for rank, (_, errors) in enumerate(results):
        for kind, match in BAD_CONFIGS[world_size].items():
            assert errors[kind] is not None and match in errors[kind], (rank, kind, errors[kind])


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_tensor_parallel_experts_match_single_process():
    errs = run_ranks(tp_worker, 2, timeout=240)
    assert max(max(e) for e in errs) <= RTOL


def test_fp8_weights_and_scales_are_checked_before_any_rank_dependent_return():
    """A rank with no local rows must refuse FP8 weights without their scales as the others do (else it would go on
    into the combine alone)."""
    q13, q2 = quantize_rows(torch.randn(2, 2 * I, H))[0], quantize_rows(torch.randn(2, H, I))[0]
    with pytest.raises(ValueError, match="both scales"):
        TorchExperts().apply(torch.randn(3, H), torch.full((3, 2), -1), torch.rand(3, 2), q13, q2)


def test_single_process_layer_equals_dense_per_token_loop():
    """The reference itself, against the formula written out per token and expert (no sorting)."""
    init_parallel_state(ParallelConfig())
    try:
        layer = FusedMoE(E, 2, H, I, params_dtype=torch.float32)
        load_layer(layer)
        x, logits = tokens("random", 3, 2)
        out = layer(x, logits)
        up_gate, down = full_weights()
        probs = torch.softmax(logits.float(), -1)
        w, ids = probs.topk(2, -1)
        w = w / w.sum(-1, keepdim=True)
        expected = torch.zeros_like(x)
        for t in range(x.shape[0]):
            for k in range(2):
                up, gate = (up_gate[ids[t, k]] @ x[t]).split(I)
                expected[t] += w[t, k] * (down[ids[t, k]] @ (up * torch.sigmoid(gate) * gate))
        assert ((out - expected).norm() / expected.norm()).item() < 1e-5
    finally:
        destroy_parallel_state()


BAD_CONFIGS = {
    4: {"indivisible": "6 experts cannot be split evenly over expert parallel size 4",
        "tp_gt_experts": "tensor parallel size 4 is larger than the number of experts 2"},
    2: {"world_size": "needs 4 processes"},
}


def bad_config_error(world_size, kind) -> str | None:
    """The ValueError message of one bad configuration on this rank (None: it was accepted)."""
    try:
        if kind == "world_size":
            init_parallel_state(ParallelConfig(tensor_parallel_size=world_size * 2, enable_expert_parallel=True))
        else:
            init_parallel_state(ParallelConfig(
                tensor_parallel_size=world_size if kind == "tp_gt_experts" else 1,
                data_parallel_size=1 if kind == "tp_gt_experts" else world_size,
                enable_expert_parallel=kind != "tp_gt_experts"))
            num_experts = {"indivisible": 6, "tp_gt_experts": 2}[kind]
            FusedMoE(num_experts, 1, H, 2 * I, params_dtype=torch.float32)
    except ValueError as exc:
        return str(exc)
    finally:
        destroy_parallel_state()
    return None
