"""The diffusers call surface on the tiny checkpoint, in process (CPU, the default dtype): every call argument and
property, ``pipe.to``, ``save_pretrained``'s arguments, and ``check_inputs`` without any weight."""

import logging
import os

import pytest
import torch
from safetensors import safe_open
from transformers import PreTrainedTokenizerFast

from omni_ep.config import ParallelConfig
from omni_ep.models.hunyuan_image3 import HunyuanImage3Config
from omni_ep.pipelines import HunyuanImage3Pipeline
from omni_ep.pipelines.hunyuan_image3.inputs import check_inputs
from omni_ep.pipelines.hunyuan_image3.variant import HunyuanImage3Variant

LATENT = (32, 16, 16)  # the tiny model's 256 x 256 bucket


@pytest.fixture
def pipe(tiny_checkpoint):
    pipe = HunyuanImage3Pipeline.from_pretrained(tiny_checkpoint)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def latents_of(pipe, prompt, **kwargs):
    return pipe(prompt, num_inference_steps=2, output_type="latent", **kwargs).images


def stop_after(step, seen):
    """A callback that records what it is given and interrupts the loop after ``step``."""

    def callback(pipe, i, t, tensors):
        seen.append((i, {k: tuple(v.shape) for k, v in tensors.items()}, pipe.num_timesteps, pipe.guidance_scale))
        pipe._interrupt = i >= step
        return tensors

    return callback


def test_cpu_defaults_fp32_weights_and_the_generation_config(pipe):
    router = pipe.transformer.model.layers[0].mlp.gate.wg.weight
    assert pipe.dtype == torch.float32 and pipe.vae.conv_in.weight.dtype == torch.float32 and router.dtype == torch.float32
    seen = []
    pipe("a cat", output_type="latent", callback_on_step_end=stop_after(0, seen))
    assert seen == [(0, {"latents": (1, *LATENT)}, 50, 5.0)]  # diff_infer_steps, diff_guidance_scale; stopped at 0
    assert pipe.interrupt and pipe.do_classifier_free_guidance
    assert (256, 256) in pipe.supported_sizes and len(pipe.supported_sizes) == 33


def test_dummy_weights_read_no_file_and_are_the_same_in_every_process(tiny_checkpoint):
    """load_format "dummy": nothing read; the decoder (like the transformer) drawn per tensor name, so another
    process or RNG state holds the same one: here, on the CPU, the tiny checkpoint's own values."""
    torch.manual_seed(7)
    dummy = HunyuanImage3Pipeline.from_pretrained(tiny_checkpoint, load_format="dummy")
    assert dummy.transformer.load_stats.bytes_read == 0 and dummy.vae.load_stats.bytes_read == 0
    stored = HunyuanImage3Pipeline.from_pretrained(tiny_checkpoint).vae.state_dict()
    for name, value in dummy.vae.state_dict().items():
        torch.testing.assert_close(value.bfloat16().float(), stored[name], rtol=0, atol=0, msg=name)


def test_every_call_argument(pipe, caplog):
    prompts = ["a cat", "a dog running through snow"]
    by_seed = latents_of(pipe, prompts, seed=7)
    by_generators = latents_of(pipe, prompts, generator=[torch.Generator().manual_seed(7 + k) for k in range(2)])
    drawn = torch.cat([torch.randn((1, *LATENT), generator=torch.Generator().manual_seed(7 + k)) for k in range(2)])
    assert torch.equal(by_seed, by_generators) and torch.equal(by_seed, latents_of(pipe, prompts, latents=drawn))
    assert torch.equal(by_seed[:1], latents_of(pipe, "a cat", generator=torch.Generator().manual_seed(7)))

    # num_images_per_prompt: image k of the batch starts from seed + k, as if generated alone
    pair = latents_of(pipe, "a cat", seed=7, num_images_per_prompt=2)
    torch.testing.assert_close(pair[0], by_seed[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(pair[1], latents_of(pipe, "a cat", seed=8)[0], rtol=1e-4, atol=1e-5)

    # negative_prompt: "" is the official all-<cfg> row; a text changes the result
    assert torch.equal(latents_of(pipe, "a dog running through snow", seed=8, negative_prompt=""), by_seed[1:])
    assert not torch.allclose(latents_of(pipe, "a dog running through snow", seed=8, negative_prompt="a cat"),
                              by_seed[1:])

    # sigmas: the default schedule given explicitly is the default; another one is another result
    assert torch.equal(latents_of(pipe, prompts, seed=7, sigmas=[1.0, 0.5]), by_seed)
    assert not torch.allclose(latents_of(pipe, prompts, seed=7, sigmas=[1.0, 0.25]), by_seed)

    # callback tensors, interrupt, no guidance (logged), a snapped size (warned), PIL output
    seen = []
    with caplog.at_level(logging.INFO, logger="omni_ep"):
        out = pipe("a cat", height=1024, width=992, num_inference_steps=4, guidance_scale=1.0, seed=7,
                   callback_on_step_end=stop_after(1, seen), callback_on_step_end_tensor_inputs=["latents", "noise_pred"])
    assert [s[0] for s in seen] == [0, 1] and seen[0][1] == {"latents": (1, *LATENT), "noise_pred": (1, *LATENT)}
    assert seen[0][2:] == (4, 1.0) and not pipe.do_classifier_free_guidance
    assert "1024x992 is not one of this model's sizes: making 256x256" in caplog.text
    assert "classifier-free guidance is off" in caplog.text
    assert [im.size for im in out.images] == [(256, 256)]


def test_to_checks_before_it_casts(pipe):
    router = pipe.transformer.model.layers[0].mlp.gate.wg.weight
    assert pipe.to("cpu") is pipe and pipe.to(torch.device("cpu")) is pipe
    for bad, error in [(("cuda", torch.bfloat16), ValueError), ((torch.int8,), ValueError), ((3,), TypeError)]:
        with pytest.raises(error):
            pipe.to(*bad)
        assert pipe.dtype == torch.float32  # nothing was cast before the error
    pipe.to("cpu", torch.bfloat16)
    assert pipe.dtype == torch.bfloat16 and router.dtype == torch.float32  # the router stays fp32
    assert pipe.vae.conv_in.weight.dtype == torch.float32  # a bf16 decode on a CPU takes minutes
    assert latents_of(pipe, "a cat", seed=7).isfinite().all()
    pipe.to(dtype=torch.float32)
    assert pipe.dtype == torch.float32


def test_fp8_pipeline_casts_around_its_experts_and_is_not_saved(tiny_checkpoint, tmp_path):
    """quantization "fp8": to(dtype) casts the rest and leaves the FP8 experts and their fp32 scales; saving is
    refused before any file is written."""
    from omni_ep.layers.fused_moe.fp8 import FP8_DTYPE

    pipe = HunyuanImage3Pipeline.from_pretrained(tiny_checkpoint, quantization="fp8")
    pipe.set_progress_bar_config(disable=True)
    experts = pipe.transformer.model.layers[0].mlp.experts
    pipe.to(torch.bfloat16)
    assert pipe.dtype == torch.bfloat16 and experts.params_dtype == torch.bfloat16
    assert experts.w13_weight.dtype == FP8_DTYPE and experts.w13_weight_scale.dtype == torch.float32
    assert latents_of(pipe, "a cat", seed=7).isfinite().all()
    with pytest.raises(ValueError, match="cannot be written back"):
        pipe.save_pretrained(tmp_path / "fp8")
    assert not (tmp_path / "fp8").exists()


def test_save_pretrained_writes_the_stored_dtype_and_refuses_what_it_cannot_do(pipe, tmp_path):
    for kwargs, error in [(dict(safe_serialization=False), ValueError), (dict(push_to_hub=True), NotImplementedError),
                          (dict(variant="fp16"), ValueError), (dict(max_shard_size="big"), ValueError),
                          (dict(token="x"), TypeError)]:
        with pytest.raises(error):
            pipe.save_pretrained(tmp_path / "refused", **kwargs)
    pipe.save_pretrained(tmp_path / "saved", max_shard_size="2MB")  # loaded in fp32 from a bf16 checkpoint
    shards = sorted((tmp_path / "saved").glob("model-*.safetensors"))
    assert len(shards) > 1
    for shard in shards:
        with safe_open(shard, "pt") as f:
            assert {f.get_slice(n).get_dtype() for n in f.keys()} == {"BF16"}, shard.name


@pytest.fixture(scope="module")
def config_and_tokenizer(tiny_checkpoint):
    """What check_inputs needs: config.json, the tokenizer, the variant (generation_config.json); no weight."""
    return (HunyuanImage3Config.from_pretrained(tiny_checkpoint), PreTrainedTokenizerFast.from_pretrained(tiny_checkpoint),
            HunyuanImage3Variant.from_pretrained(tiny_checkpoint))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(prompt=[]), "non-empty list"),
        (dict(height=250), "multiples of 16"),
        (dict(num_inference_steps=0), "num_inference_steps must be >= 1"),
        (dict(output_type="jpeg"), "output_type must be one of"),
        (dict(prompt="word " * 2000), "max_position_embeddings \\(2048\\); shorten it to at most 1786 tokens"),
        (dict(negative_prompt="a cat sitting on a red chair in the sun"), "negative prompt has"),
        (dict(negative_prompt=["a", "b"]), "2 negative prompts for 1 prompts"),
        (dict(layout=ParallelConfig(cfg_parallel_size=2), guidance_scale=1.0), "needs guidance_scale > 1"),
        (dict(generator=[torch.Generator()] * 3, num_images_per_prompt=2), "3 generators for 2 images"),
        (dict(generator=torch.Generator(), seed=1), "seed or generator, not both"),
        (dict(latents=torch.zeros(1, 32, 8, 8)), "latents must be \\[images, C, h, w\\] = \\[1, 32, 16, 16\\]"),
        (dict(sigmas=[0.5, 1.0]), "strictly decreasing"),
        (dict(sigmas=[1.0, 0.5], num_inference_steps=3), "num_inference_steps=3 but 2 sigmas"),
        (dict(callback_on_step_end_tensor_inputs=["prompt_embeds"]), "unknown"),
        (dict(num_images_per_prompt=0), "num_images_per_prompt must be an integer >= 1"),
    ],
)
def test_check_inputs_needs_no_weight(config_and_tokenizer, kwargs, match):
    config, tokenizer, variant = config_and_tokenizer
    layout = kwargs.pop("layout", ParallelConfig())
    kwargs.setdefault("prompt", "a cat")
    with pytest.raises(ValueError, match=match):
        check_inputs(config, tokenizer, layout, variant, **kwargs)


def test_a_bad_call_raises_before_the_first_step(pipe):
    with pytest.raises(ValueError, match="multiples of 16"):
        pipe("a cat", height=250, callback_on_step_end=lambda *a: pytest.fail("a step ran"))


def test_missing_checkpoint_folder():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        HunyuanImage3Pipeline.from_pretrained(os.path.join("/nonexistent", "hunyuan"))
