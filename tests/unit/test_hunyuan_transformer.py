"""The HunyuanImage-3.0 transformer on the tiny checkpoint (fp32, one process): against an independent
re-implementation, the text-prefix KV cache, and dropping <eoi>."""


import pytest
import torch

from tests.unit.hunyuan_reference import (
    ensure_single_process_state,
    load_checkpoint_tensors,
    reference_velocity,
    tiny_checkpoint_path,
    tiny_inputs,
)
from omni_ep.models.hunyuan_image3 import HunyuanImage3KVCache, load_transformer

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def model():
    ensure_single_process_state()
    return load_transformer(tiny_checkpoint_path(), dtype=torch.float32, device="cpu")


@torch.no_grad()
@pytest.mark.parametrize("adapters", ["contiguous", "channels_last"])
def test_forward_matches_independent_reference(model, adapters):
    """Also with the adapters' conv weights channels-last, as the loader stores them on CUDA."""
    if adapters == "channels_last":
        model = load_transformer(tiny_checkpoint_path(), dtype=torch.float32, device="cpu").adapters_channels_last()
        for conv in (model.patch_embed.model[0], model.final_layer.model[1][2]):
            assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    config, tensors = load_checkpoint_tensors(tiny_checkpoint_path())
    ids, latents, t, image_slice, ts_idx = tiny_inputs(config["vocab_size"], batch=2, h=3, w=4)
    got = model(latents, t, image_slice, ts_idx, input_ids=ids)
    want = reference_velocity(config, tensors, ids, latents, t, image_slice, ts_idx)
    assert got.shape == (2, 32, 3, 4)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert want.abs().mean() > 0.05  # a real signal, not zeros


@torch.no_grad()
def test_final_layer_reads_hidden_states_without_ln_f(model):
    """ln_f is not even built: the checkpoint's model.ln_f.weight is skipped, and no module applies it."""
    names = dict(model.named_parameters())
    assert not any("ln_f" in n or "lm_head" in n for n in names)
    assert "model.ln_f.weight" not in model.load_stats.names_read


@torch.no_grad()
def test_kv_cache_steps_equal_full_sequence_forward(model):
    ids, latents, t, image_slice, ts_idx = tiny_inputs(model.config.vocab_size, batch=2, h=4, w=4, seed=1)
    cache = HunyuanImage3KVCache()
    gen = torch.Generator().manual_seed(5)
    for step in range(3):
        full = model(latents, t, image_slice, ts_idx, input_ids=ids)
        cached = model(latents, t, image_slice, ts_idx, input_ids=ids if step == 0 else None, kv_cache=cache)
        torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)
        assert cache.is_filled and cache.prefix_len == ts_idx
        assert cache.keys[0].shape == (2, model.config.num_key_value_heads, ts_idx, model.config.attention_head_dim)
        latents = latents + 0.1 * torch.randn(latents.shape, generator=gen)
        t = t * 0.7


@torch.no_grad()
def test_eoi_after_the_image_does_not_change_image_outputs(model):
    ids, latents, t, image_slice, ts_idx = tiny_inputs(model.config.vocab_size, batch=1, h=2, w=3, seed=2)
    with_eoi = model(latents, t, image_slice, ts_idx, input_ids=ids)
    without = model(latents, t, image_slice, ts_idx, input_ids=ids[:, : image_slice.stop])
    other_tail = ids.clone()
    other_tail[:, image_slice.stop :] = (other_tail[:, image_slice.stop :] + 7) % model.config.vocab_size
    torch.testing.assert_close(with_eoi, without, rtol=0, atol=1e-6)
    torch.testing.assert_close(model(latents, t, image_slice, ts_idx, input_ids=other_tail), with_eoi, rtol=0, atol=1e-6)


@torch.no_grad()
def test_text_prefix_changes_the_output(model):
    """The cache must not be reused for another prompt: the prefix does matter."""
    ids, latents, t, image_slice, ts_idx = tiny_inputs(model.config.vocab_size, batch=1, seed=3)
    other = ids.clone()
    other[:, 1] = (other[:, 1] + 1) % model.config.vocab_size
    a = model(latents, t, image_slice, ts_idx, input_ids=ids)
    b = model(latents, t, image_slice, ts_idx, input_ids=other)
    assert (a - b).abs().max() > 1e-4


@torch.no_grad()
def test_bad_inputs_raise_clear_errors(model):
    ids, latents, t, image_slice, ts_idx = tiny_inputs(model.config.vocab_size, batch=1)
    with pytest.raises(ValueError, match="image_slice"):
        model(latents, t, slice(image_slice.start, image_slice.stop - 1), ts_idx, input_ids=ids)
    with pytest.raises(ValueError, match="timestep_index"):
        model(latents, t, image_slice, image_slice.start, input_ids=ids)
    with pytest.raises(ValueError, match="input_ids"):
        model(latents, t, image_slice, ts_idx)
    cache = HunyuanImage3KVCache()
    model(latents, t, image_slice, ts_idx, input_ids=ids, kv_cache=cache)
    with pytest.raises(ValueError, match="reset"):
        model(latents, t, slice(image_slice.start + 1, image_slice.stop + 1), ts_idx + 1, kv_cache=cache)
