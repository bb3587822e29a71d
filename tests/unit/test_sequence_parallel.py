"""Sequence parallel: the sharding arithmetic, mask-free blocks of the pattern, the log-sum-exp merge (in process);
Ulysses, ring and both against segmented_attention on random tensors, and the tiny transformer layer by layer
against one process (step 0 and cached steps), on one spawn of 4 gloo ranks (SP2 layouts run twice, x DP2). fp32."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from omni_ep.config import ParallelConfig
from omni_ep.distributed import destroy_parallel_state, get_sp_group, init_parallel_state
from omni_ep.distributed.sequence_shards import SequenceShards, sequence_shard_len
from omni_ep.layers.attention.ring import AttentionBlock, OnlineSoftmax, _attention_with_lse_math, attention_with_lse
from omni_ep.layers.attention.ulysses import check_ulysses_heads
from omni_ep.models.hunyuan_image3 import HunyuanImage3KVCache, HunyuanImage3Transformer2DModel, load_transformer
from omni_ep.models.hunyuan_image3.attention import segmented_attention
from omni_ep.models.hunyuan_image3.attention_mask import (
    AttentionSegment,
    attention_segments,
    build_attention_mask,
    segment_blocks,
)
from omni_ep.models.hunyuan_image3.make_tiny_checkpoint import tiny_config
from omni_ep.models.hunyuan_image3.sequence_parallel import HunyuanImage3SequenceParallelAttention, pad_segments
from tests.launcher import run_ranks
from tests.unit.hunyuan_reference import ensure_single_process_state, tiny_checkpoint_path, tiny_inputs

ATOL = RTOL = 1e-5


# ---- sharding arithmetic -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "start, stop, world_size, shard_len, padded_stop, bounds",
    [
        (0, 275, 4, 69, 276, [(0, 69), (69, 138), (138, 207), (207, 276)]),  # step 0: one padding token
        (30, 287, 2, 129, 288, [(30, 159), (159, 288)]),  # a cached step: <timestep> + 256 image tokens
        (10, 14, 2, 2, 14, [(10, 12), (12, 14)]),  # divides: no padding
        (0, 5, 4, 2, 8, [(0, 2), (2, 4), (4, 6), (6, 8)]),  # the last share is all padding
    ],
)
def test_sequence_shards(start, stop, world_size, shard_len, padded_stop, bounds):
    shards = SequenceShards(start, stop, world_size)
    assert (shards.shard_len, shards.padded_stop, shards.padding) == (shard_len, padded_stop, padded_stop - stop)
    assert [shards.bounds(r) for r in range(world_size)] == bounds
    assert sequence_shard_len(stop - start, world_size) == shard_len
    x = torch.arange(1.0, stop - start + 1).reshape(1, -1, 1).expand(2, -1, 3)  # [B, S, H], no zeros
    parts = [shards.shard(x, r, dim=1) for r in range(world_size)]
    assert all(p.shape == (2, shard_len, 3) for p in parts)
    whole = torch.cat(parts, dim=1)
    assert torch.equal(shards.unpad(whole, dim=1), x)
    assert (whole[:, stop - start :] == 0).all()  # padding is zeros


def test_sequence_shards_refuse_bad_arguments():
    with pytest.raises(ValueError, match="start <= stop"):
        SequenceShards(5, 3, 2)
    with pytest.raises(ValueError, match="world_size"):
        SequenceShards(0, 3, 0)
    with pytest.raises(ValueError, match="rank must be"):
        SequenceShards(0, 3, 2).bounds(2)
    with pytest.raises(ValueError, match="should hold"):
        SequenceShards(0, 3, 2).shard(torch.zeros(4, 2), 0, dim=0)


# ---- the pattern in mask-free blocks ---------------------------------------------------------------------------
PATTERNS = {  # seq_len, image slices, query_start
    "step 0": (23, [(9, 21)], 0),
    "cached": (21, [(9, 21)], 8),
    "two images, text between": (30, [(4, 10), (14, 26)], 0),
}


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("q_block, k_block", [(1, 1), (3, 5), (7, 4), (8, 8), (13, 30)])
def test_segment_blocks_cover_the_mask_once(pattern, q_block, k_block):
    seq_len, slices, q_start = PATTERNS[pattern]
    segments = attention_segments(seq_len, slices, query_start=q_start)
    mask = build_attention_mask(seq_len, slices, query_start=q_start)
    count = torch.zeros(mask.shape, dtype=torch.int64)
    for q0 in range(q_start, seq_len, q_block):
        q1 = min(q0 + q_block, seq_len)
        for k0 in range(0, seq_len, k_block):
            k1 = min(k0 + k_block, seq_len)
            for b in segment_blocks(segments, (q0, q1), (k0, k1)):
                assert q0 <= b.q_start < b.q_end <= q1 and k0 <= b.k_start < b.k_end <= k1, b
                seen = torch.ones(b.q_end - b.q_start, b.k_end - b.k_start, dtype=torch.int64)
                count[b.q_start - q_start : b.q_end - q_start, b.k_start : b.k_end] += seen.tril() if b.causal else seen
    assert torch.equal(count, mask.long())  # every visible key once, no hidden one


def test_attention_block_refuses_non_square_causal_blocks():
    with pytest.raises(ValueError, match="must be square"):
        AttentionBlock(2, 5, 0, 4, causal=True)


# ---- log-sum-exp attention and its merge -------------------------------------------------------------------------
def _random_qkv(seed, B=2, N=4, K=2, L=9, L_k=13, D=16):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, N, L, D, generator=g)
    return q, torch.randn(B, K, L_k, D, generator=g), torch.randn(B, K, L_k, D, generator=g)


@pytest.mark.parametrize("causal", [False, True])
def test_attention_with_lse_matches_sdpa_and_the_formula(causal):
    q, k, v = _random_qkv(0, L=9, L_k=9)
    out, lse = attention_with_lse(q, k, v, causal)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True))
    out_math, lse_math = _attention_with_lse_math(q, k, v, causal)
    torch.testing.assert_close(out, out_math, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(lse, lse_math, rtol=RTOL, atol=ATOL)


def test_online_softmax_over_key_blocks_is_exact():
    q, k, v = _random_qkv(1, L=9, L_k=13)
    segments = (AttentionSegment(4, 13, 13, causal=True),)  # queries at positions 4..12 see the keys up to their own
    mask = torch.arange(13)[None, :] <= torch.arange(4, 13)[:, None]
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True).transpose(1, 2)
    softmax = OnlineSoftmax(q)
    for k0, k1 in [(7, 13), (0, 3), (3, 7)]:  # key blocks in any order
        blocks = segment_blocks(segments, (4, 13), (k0, k1))
        softmax.attend(k[:, :, k0:k1], v[:, :, k0:k1], [b.shifted(4, k0) for b in blocks])
    torch.testing.assert_close(softmax.result(), expected, rtol=RTOL, atol=ATOL)


def test_ulysses_heads_must_split_over_tp_and_ulysses():
    for heads, kv_heads, ulysses, tp in [(32, 8, 2, 1), (32, 8, 8, 1), (32, 8, 2, 4), (32, 8, 4, 4), (4, 2, 2, 2),
                                         (4, 2, 4, 1)]:
        check_ulysses_heads(heads, kv_heads, ulysses, tp)  # KV heads split, or each shared by ulysses / kv ranks
    with pytest.raises(ValueError, match="change --ulysses-degree or --tensor-parallel-size"):
        check_ulysses_heads(32, 8, 3, 1)
    with pytest.raises(ValueError, match="8 attention heads each TP rank holds"):
        check_ulysses_heads(32, 8, 16, 4)
    with pytest.raises(ValueError, match="6 KV heads"):
        check_ulysses_heads(24, 6, 4, 1)
    with pytest.raises(ValueError, match="change --tensor-parallel-size"):
        check_ulysses_heads(32, 8, 1, 3)


# ---- on 4 spawned ranks -----------------------------------------------------------------------------------------
WORLD_SIZE = 4
ATTENTION_LAYOUTS = {
    "U2 (x DP2)": dict(ulysses_degree=2, data_parallel_size=2), "R2 (x DP2)": dict(ring_degree=2, data_parallel_size=2),
    "U2xR2": dict(ulysses_degree=2, ring_degree=2), "R4": dict(ring_degree=4),
    "U4 (KV heads shared)": dict(ulysses_degree=4),
}
MODEL_LAYOUTS = {
    "U2 (x DP2)": dict(ulysses_degree=2, data_parallel_size=2),
    "R2+EP (x DP2)": dict(ring_degree=2, data_parallel_size=2, enable_expert_parallel=True),
    "U2xR2+EP": dict(ulysses_degree=2, ring_degree=2, enable_expert_parallel=True, all2all_backend="all2all"),
    "U2xTP2+EP": dict(ulysses_degree=2, tensor_parallel_size=2, enable_expert_parallel=True),
}
# Attention inputs: text prefix [0, 14) (longer than one share of step 0 under SP2: 13 of 25), <timestep> at 14, an
# image block [15, 23), a text tail [23, 25); cached steps run [14, 23): 9 tokens, padded under SP2 and SP4.
SEQ_LEN, TIMESTEP, IMAGE = 25, 14, (15, 23)
# Model inputs: prompt of 20 tokens (prefix 24 > the SP2 share 21 of step 0's 41 tokens), 3 x 5 image tokens.
PROMPT_LEN, LATENT_H, LATENT_W = 20, 3, 5


def _attention_inputs():
    """(step 0 q, k, v over all SEQ_LEN tokens, cached-step q, k, v over [TIMESTEP, IMAGE end)), B 2, N 4, N_kv 2."""
    g = torch.Generator().manual_seed(7)
    cached_len = IMAGE[1] - TIMESTEP
    step0 = [torch.randn(2, n, SEQ_LEN, 8, generator=g) for n in (4, 2, 2)]
    cached = [torch.randn(2, n, cached_len, 8, generator=g) for n in (4, 2, 2)]
    return step0, cached


def _passes():
    """The two passes, step 0 and a cached step: (first position, stop, segments)."""
    return [(0, SEQ_LEN, attention_segments(SEQ_LEN, [IMAGE], 0)),
            (TIMESTEP, IMAGE[1], attention_segments(IMAGE[1], [IMAGE], TIMESTEP))]


def _sp_attention():
    """This rank's output share of both passes: [B, L, N, D] each, with the KV cache filled by the first."""
    attention, cache, sp = HunyuanImage3SequenceParallelAttention(layer_idx=0), HunyuanImage3KVCache(), get_sp_group()
    cache.begin_fill(TIMESTEP)
    outs = []
    for (start, stop, segments), qkv in zip(_passes(), _attention_inputs()):
        shards = SequenceShards(start, stop, sp.world_size)
        q, k, v = (shards.shard(x, sp.rank, dim=2) for x in qkv)
        outs.append(attention(q, k, v, pad_segments(shards, segments), cache))
        cache.end_fill()
    return outs


def _single_attention():
    cache, outs = HunyuanImage3KVCache(), []
    cache.begin_fill(TIMESTEP)
    for (_, _, segments), (q, k, v) in zip(_passes(), _attention_inputs()):
        k, v = cache.store_or_extend(0, k, v)
        outs.append(segmented_attention(q, k, v, segments))
        cache.end_fill()
    return outs


def _model_passes(path):
    """Every decoder layer's output (this rank's share) and the velocity, of step 0 and two cached steps."""
    model = load_transformer(path, dtype=torch.float32, device="cpu")
    layer_outputs = []  # a decoder layer returns (MoE output, residual): its output is their sum

    def keep_output(layer, args, kwargs, out):
        y = out[0] + out[1]
        if layer.tp_chunks:  # this TP rank's row chunk of the B x S tokens
            B, S = kwargs["batch_tokens"]
            y = layer.tp_group.all_gather_row_chunks(y, B * S).view(B, S, -1)
        layer_outputs.append(y)

    for layer in model.model.layers:
        layer.register_forward_hook(keep_output, with_kwargs=True)
    ids, latents, t, image_slice, ts = tiny_inputs(model.config.vocab_size, batch=2, prompt_len=PROMPT_LEN,
                                                   h=LATENT_H, w=LATENT_W)
    cache = HunyuanImage3KVCache()
    with torch.no_grad():
        velocities = [model(latents, t, image_slice, ts, input_ids=ids, kv_cache=cache),
                      model(latents * 0.5, t * 0.7, image_slice, ts, kv_cache=cache),
                      model(latents * 0.2, t * 0.3, image_slice, ts, kv_cache=cache)]
    passes = [(0, ids.shape[1])] + [(ts, image_slice.stop)] * 2
    return velocities, layer_outputs, passes


def _spawned_worker(rank, world_size, path):
    results = {}
    for name, layout in ATTENTION_LAYOUTS.items():
        init_parallel_state(ParallelConfig(**layout))
        try:
            results[f"attention {name}"] = (get_sp_group().rank, get_sp_group().world_size, _sp_attention())
        finally:
            destroy_parallel_state()
    for name, layout in MODEL_LAYOUTS.items():
        init_parallel_state(ParallelConfig(**layout))
        try:
            results[f"model {name}"] = (get_sp_group().rank, get_sp_group().world_size, _model_passes(path))
        finally:
            destroy_parallel_state()
    init_parallel_state(ParallelConfig(ulysses_degree=4))
    try:  # 6 heads do not split over 4 ulysses ranks: every rank refuses while building, before any collective
        HunyuanImage3Transformer2DModel(dataclasses.replace(tiny_config(), num_attention_heads=6))
    except ValueError as error:
        results["U4 with 6 heads"] = str(error)
    finally:
        destroy_parallel_state()
    return results


@pytest.fixture(scope="module")
def spawned():
    """Every rank's results from one spawn of WORLD_SIZE gloo ranks."""
    return run_ranks(_spawned_worker, WORLD_SIZE, tiny_checkpoint_path(), timeout=240)


@pytest.mark.slow
def test_ulysses_and_ring_attention_match_segmented_attention(spawned):
    expected = _single_attention()  # [B, S, N, D] of both passes
    for name in ATTENTION_LAYOUTS:
        for results in spawned:
            sp_rank, sp_size, outs = results[f"attention {name}"]
            for (start, stop, _), out, ref in zip(_passes(), outs, expected):
                first, last = SequenceShards(start, stop, sp_size).bounds(sp_rank)
                real = min(last, stop) - first  # rows past stop are padding
                torch.testing.assert_close(out[:, :real], ref[:, first - start : first - start + real], rtol=RTOL,
                                           atol=ATOL, msg=lambda m: f"{name} SP rank {sp_rank} pass at {start}: {m}")


@pytest.mark.slow
def test_transformer_layers_and_velocity_match_one_process(spawned):
    ensure_single_process_state()
    ref_velocities, ref_layers, passes = _model_passes(tiny_checkpoint_path())
    for name in MODEL_LAYOUTS:
        for results in spawned:
            sp_rank, sp_size, (velocities, layers, _) = results[f"model {name}"]
            for step, (v, ref) in enumerate(zip(velocities, ref_velocities)):
                torch.testing.assert_close(v, ref, rtol=RTOL, atol=ATOL, msg=lambda m: f"{name} velocity {step}: {m}")
            num_layers = len(ref_layers) // len(passes)
            for i, (out, ref) in enumerate(zip(layers, ref_layers)):
                start, stop = passes[i // num_layers]
                first, last = SequenceShards(start, stop, sp_size).bounds(sp_rank)
                real = min(last, stop) - first
                torch.testing.assert_close(out[:, :real], ref[:, first - start : first - start + real], rtol=RTOL,
                                           atol=ATOL, msg=lambda m: f"{name} SP rank {sp_rank} layer output {i}: {m}")


@pytest.mark.slow
def test_heads_that_do_not_split_over_ulysses_are_refused_on_every_rank(spawned):
    for rank, results in enumerate(spawned):
        assert "change --ulysses-degree or --tensor-parallel-size" in results.get("U4 with 6 heads", ""), rank
