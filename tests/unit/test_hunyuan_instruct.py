"""HunyuanImage-3.0-Instruct and -Instruct-Distil on tiny checkpoints (fp32, one process): the config fields, the
released layouts, the Distil transformer against the independent reference and with the KV cache, the loader's
contract between flags and tensors, the variant (defaults, layouts, system prompts), the pipeline's MoE bound and
per-step inputs, and the command line."""

import json
import logging
import os
import shutil

import PIL.Image
import pytest
import torch
from safetensors import safe_open

from omni_ep.config import ParallelConfig
from omni_ep.distributed import destroy_parallel_state, init_parallel_state, is_parallel_state_initialized
from omni_ep.models.hunyuan_image3 import CheckpointError, HunyuanImage3Config, HunyuanImage3KVCache, load_transformer
from omni_ep.pipelines import HunyuanImage3Pipeline
from omni_ep.pipelines.hunyuan_image3.variant import HunyuanImage3Variant, read_system_prompt_presets
from tests.unit.hunyuan_reference import (
    ensure_single_process_state,
    load_checkpoint_tensors,
    reference_velocity,
    tiny_checkpoint_path,
)

pytestmark = pytest.mark.timeout(120)

DISTIL_EXTRA = {f"{m}.mlp.{i}.{p}" for m in ("guidance_emb", "timestep_r_emb") for i in (0, 2) for p in ("weight", "bias")}


def distil_inputs(vocab_size, batch=1, prompt_len=5, h=3, w=4, seed=0):
    """(input_ids, latents, t, G, r, image_slice, timestep_index): <bos> prompt <boi> <size> <ratio> <timestep>
    <guidance> <timestep_r> <img> x h*w <eoi> with random ids."""
    gen = torch.Generator().manual_seed(seed)
    timestep_index = 1 + prompt_len + 3
    image_slice = slice(timestep_index + 3, timestep_index + 3 + h * w)
    input_ids = torch.randint(0, vocab_size, (batch, image_slice.stop + 1), generator=gen)
    latents = torch.randn(batch, 32, h, w, generator=gen)
    t = torch.rand(batch, generator=gen) * 1000
    return input_ids, latents, t, torch.full((batch,), 2496.0), t * 0.8, image_slice, timestep_index


@pytest.fixture(scope="module")
def distil():
    ensure_single_process_state()
    return load_transformer(tiny_checkpoint_path("instruct-distil"), dtype=torch.float32, device="cpu")


# ---- config and checkpoint layouts -------------------------------------------------------------------------
def test_config_flags_meta_slots_and_round_trip(tmp_path):
    base = json.load(open(os.path.join(tiny_checkpoint_path(), "config.json")))
    assert not {"cfg_distilled", "use_meanflow", "model_version", "rope_type"} & set(base)  # base file: none
    assert HunyuanImage3Config.from_dict(base).meta_slots == ("timestep",)
    instruct = HunyuanImage3Config.from_pretrained(tiny_checkpoint_path("instruct"))
    assert (instruct.cfg_distilled, instruct.use_meanflow, instruct.meta_slots) == (False, False, ("timestep",))
    instruct.to_json_file(tmp_path / "config.json")
    assert json.loads((tmp_path / "config.json").read_text())["cfg_distilled"] is False  # explicit false kept
    distil = HunyuanImage3Config.from_pretrained(tiny_checkpoint_path("instruct-distil"))
    assert distil.meta_slots == ("timestep", "guidance", "timestep_r") and distil.rope_type == "2d"
    with pytest.raises(ValueError, match="rope_type"):
        HunyuanImage3Config.from_dict({**base, "rope_type": "default"})


def test_released_layouts_of_the_variants():
    def names(variant):
        with open(os.path.join(tiny_checkpoint_path(variant), "model.safetensors.index.json")) as f:
            return set(json.load(f)["weight_map"])

    assert names("instruct") == names("base")  # Instruct: the base tensor names
    assert names("instruct-distil") - names("instruct") == DISTIL_EXTRA and names("instruct") <= names("instruct-distil")
    path = tiny_checkpoint_path("instruct-distil")
    weight_map = json.load(open(os.path.join(path, "model.safetensors.index.json")))["weight_map"]
    with safe_open(os.path.join(path, weight_map["guidance_emb.mlp.0.weight"]), "pt") as f:
        assert f.get_slice("guidance_emb.mlp.0.weight").get_shape() == [64, 256]
    generation = {v: json.load(open(os.path.join(tiny_checkpoint_path(v), "generation_config.json")))
                  for v in ("base", "instruct", "instruct-distil")}
    assert [(g["sequence_template"], g["diff_infer_steps"], g["diff_guidance_scale"]) for g in generation.values()] == [
        ("pretrain", 50, 5.0), ("instruct", 50, 2.5), ("instruct", 8, 2.5)]
    tokenizer = json.load(open(os.path.join(path, "special_tokens_map.json")))["additional_special_tokens"]
    assert {"<guidance>", "<timestep_r>", "<answer>", "</recaption>", "<img_ratio_36>"} <= set(tokenizer)


# ---- the Distil transformer ------------------------------------------------------------------------------
@torch.no_grad()
def test_distil_forward_matches_independent_reference(distil):
    config, tensors = load_checkpoint_tensors(tiny_checkpoint_path("instruct-distil"))
    ids, latents, t, G, r, image_slice, ts = distil_inputs(config["vocab_size"], batch=1, h=2, w=3)
    got = distil(latents, t, image_slice, ts, input_ids=ids, guidance=G, timestep_r=r)
    want = reference_velocity(config, tensors, ids, latents, t, image_slice, ts, guidance=G, timestep_r=r)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # both slots matter: another G or r changes the velocity
    assert (distil(latents, t, image_slice, ts, input_ids=ids, guidance=G * 2, timestep_r=r) - got).abs().max() > 1e-4
    assert (distil(latents, t, image_slice, ts, input_ids=ids, guidance=G, timestep_r=r * 0) - got).abs().max() > 1e-4


@torch.no_grad()
def test_cached_steps_fill_the_meta_slots_without_input_ids(distil):
    """Steps >= 1 run [<timestep>, <guidance>, <timestep_r>, image] from the embedders alone and equal a whole
    forward; t and r change every step, as in the 8-step schedule."""
    ids, latents, t, G, r, image_slice, ts = distil_inputs(distil.config.vocab_size, batch=1, h=4, w=4, seed=1)
    cache = HunyuanImage3KVCache()
    for step in range(3):
        full = distil(latents, t, image_slice, ts, input_ids=ids, guidance=G, timestep_r=r)
        cached = distil(latents, t, image_slice, ts, input_ids=ids if step == 0 else None, kv_cache=cache,
                        guidance=G, timestep_r=r)
        torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)
        assert cache.prefix_len == ts
        latents, t, r = latents * 0.9 + 0.1, r, r * 0.7


@torch.no_grad()
def test_meta_inputs_must_match_the_checkpoint(distil):
    ids, latents, t, G, r, image_slice, ts = distil_inputs(distil.config.vocab_size)
    with pytest.raises(ValueError, match="cfg_distilled=true: pass guidance"):
        distil(latents, t, image_slice, ts, input_ids=ids, timestep_r=r)
    with pytest.raises(ValueError, match="use_meanflow=true: pass timestep_r"):
        distil(latents, t, image_slice, ts, input_ids=ids, guidance=G)
    with pytest.raises(ValueError, match="room for the 3 meta slot"):
        distil(latents, t, image_slice, image_slice.start - 2, input_ids=ids, guidance=G, timestep_r=r)
    cache = HunyuanImage3KVCache()
    with pytest.raises(ValueError, match="pass guidance"):  # checked before the cache is touched
        distil(latents, t, image_slice, ts, input_ids=ids, kv_cache=cache)
    assert cache.prefix_len is None
    base = load_transformer(tiny_checkpoint_path(), dtype=torch.float32, device="cpu")
    assert base.guidance_emb is None and base.timestep_r_emb is None
    with pytest.raises(ValueError, match="guidance was given but this checkpoint has no cfg_distilled"):
        base(latents, t, image_slice, ts, input_ids=ids, guidance=G)


@pytest.mark.parametrize("variant, flag, message", [
    ("instruct-distil", "cfg_distilled", "holds guidance_emb.* but config.json has cfg_distilled=False"),
    ("instruct", "use_meanflow", "use_meanflow=true but .* holds no timestep_r_emb"),
])
def test_loader_insists_that_flags_and_tensors_agree(tmp_path, variant, flag, message):
    ensure_single_process_state()
    path = shutil.copytree(tiny_checkpoint_path(variant), tmp_path / "ckpt")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, flag: not config[flag]}))
    with pytest.raises(CheckpointError, match=message):
        load_transformer(path, dtype=torch.float32)


# ---- the variant ---------------------------------------------------------------------------------------------
def test_variants_and_their_defaults():
    base, instruct, distil = (HunyuanImage3Variant.from_pretrained(tiny_checkpoint_path(v))
                              for v in ("base", "instruct", "instruct-distil"))
    assert [v.name for v in (base, instruct, distil)] == ["base", "instruct", "instruct-distil"]
    assert (base.template.name, instruct.template.name, distil.template.meta_slots) == (
        "pretrain", "instruct", ("timestep", "guidance", "timestep_r"))
    assert distil.defaults(None, None, None) == (8, 2.5, 3.0) and distil.defaults(3, 4.0, 2.0) == (3, 4.0, 2.0)
    assert base.defaults(None, None, None) == (50, 5.0, 3.0)
    assert base.does_cfg(5.0) and instruct.does_cfg(2.5) and not instruct.does_cfg(1.0) and not distil.does_cfg(5.0)
    timesteps = torch.tensor([1000.0, 750.0, 500.0])
    assert base.step_conditioning(timesteps, 5.0) == {}
    extra = distil.step_conditioning(timesteps, 2.5)
    assert extra["guidance"].tolist() == [2496.0] * 3 and extra["timestep_r"].tolist() == [750.0, 500.0, 0.0]


def test_cfg_parallel_on_a_distilled_checkpoint_fails_before_loading():
    message = r"CFG parallel \(cfg_parallel_size=2\) has nothing to split\. Use tensor parallel \(TP\), sequence " \
              r"parallel \(SP: ulysses / ring\) or data parallel \(DP"
    with pytest.raises(ValueError, match=message):  # one process: init_parallel_state would fail on the world size
        HunyuanImage3Pipeline.from_pretrained(tiny_checkpoint_path("instruct-distil"),
                                              parallel_config=ParallelConfig(cfg_parallel_size=2))
    assert not is_parallel_state_initialized()
    HunyuanImage3Variant.from_pretrained(tiny_checkpoint_path("instruct")).check_parallel_config(
        ParallelConfig(cfg_parallel_size=2))  # Instruct runs CFG: fine


SYSTEM_PROMPT_PY = '''raise RuntimeError("system_prompt.py must be parsed, never run")
t2i_system_prompt_en_vanilla = """
Draw well.
"""
t2i_system_prompt_en_recaption = "Rewrite, then draw."
unified_system_prompt_en = "You are unified."
'''


def test_system_prompts_from_the_checkpoint_folder(tmp_path, caplog):
    (tmp_path / "system_prompt.py").write_text(SYSTEM_PROMPT_PY)
    presets = read_system_prompt_presets(tmp_path)
    assert presets == {"en_vanilla": "\nDraw well.\n", "en_recaption": "Rewrite, then draw.",
                       "en_unified": "You are unified."}
    config = HunyuanImage3Config.from_pretrained(tiny_checkpoint_path("instruct-distil"))
    generation = json.load(open(os.path.join(tiny_checkpoint_path("instruct-distil"), "generation_config.json")))

    def variant(**gen):
        return HunyuanImage3Variant.from_configs(config, {**generation, **gen}, presets)

    assert variant().text_sections()["system_prompt"] is None  # generation_config "None"
    assert variant(use_system_prompt="en_unified").text_sections()["system_prompt"] == "You are unified."
    assert variant(use_system_prompt="dynamic").text_sections()["system_prompt"] == "Draw well."  # stripped
    assert variant(use_system_prompt="dynamic").text_sections(recaption="r")["system_prompt"] == "Rewrite, then draw."
    sections = variant(use_system_prompt="en_unified").text_sections("My own words.", recaption="r")
    assert sections == dict(system_prompt="My own words.", think=None, recaption="r")
    assert variant(use_system_prompt="en_unified").text_sections("")["system_prompt"] is None
    dropped = variant(use_system_prompt="en_unified", drop_think=True).text_sections(think="t", recaption="r")
    assert dropped == dict(system_prompt="Rewrite, then draw.", think=None, recaption="r")
    with pytest.raises(ValueError, match="preset 'likeness' is not available"):
        variant().text_sections("likeness")
    with caplog.at_level(logging.WARNING):  # the checkpoint's own choice, missing: a warning, no system prompt
        assert variant(use_system_prompt="en_think_recaption").text_sections()["system_prompt"] is None
    assert "en_think_recaption" in caplog.text
    with pytest.raises(ValueError, match="pretrain template"):
        HunyuanImage3Variant.from_pretrained(tiny_checkpoint_path()).text_sections(recaption="r")


# ---- the pipeline ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant, images, rows, meta", [("instruct-distil", 1, 1, 3), ("instruct-distil", 2, 2, 3),
                                                          ("instruct", 1, 2, 1)])
def test_pipeline_feeds_each_step_and_bounds_the_moe_tokens(monkeypatch, variant, images, rows, meta):
    """Distil: one row per image, G = bf16(1000 g) and r = the next timestep on every step, the cached pass
    [<timestep>, <guidance>, <timestep_r>, 256 image tokens]; Instruct: CFG rows [cond; uncond] and no meta inputs."""
    init_parallel_state(ParallelConfig())
    try:
        pipe = HunyuanImage3Pipeline.from_pretrained(tiny_checkpoint_path(variant), torch_dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        bounds, calls = [], []
        monkeypatch.setattr(pipe, "moe_token_bounds", lambda *a: bounds.append(a) or a)
        forward = pipe.transformer.forward

        def spy(latents, t, *args, **kwargs):
            calls.append((latents.shape[0], t.tolist(), {k: v.tolist() for k, v in kwargs.items()
                                                         if k in ("guidance", "timestep_r")}))
            return forward(latents, t, *args, **kwargs)

        monkeypatch.setattr(pipe.transformer, "forward", spy)
        call = dict(height=256, width=256, num_inference_steps=3, guidance_scale=3.0, recaption="a red cat")
        pipe("a cat", seed=0, output_type="latent", num_images_per_prompt=images, **call)
        sequence = pipe.encode_prompt(pipe.check_inputs("a cat", **call), 0)
    finally:
        destroy_parallel_state()
    assert bounds == [(rows * sequence.input_ids.shape[1], rows * (meta + 256))]
    timesteps = [1000.0, 6000 / 7, 600.0]  # 3 steps, shift 3: s = 1, 2/3, 1/3 -> 3s / (1 + 2s) = 1, 6/7, 3/5
    for step, (batch, t, extra) in enumerate(calls):
        assert batch == rows and t == pytest.approx([timesteps[step]] * rows)
        if variant == "instruct-distil":
            assert extra["guidance"] == [3008.0] * rows
            assert extra["timestep_r"] == pytest.approx([(timesteps[1:] + [0])[step]] * rows)
        else:
            assert extra == {}


def test_negative_prompt_on_the_instruct_templates():
    """Instruct: the negative prompt takes the prompt's place in the uncond row ("" is the all-<cfg> row); Distil
    has no uncond row, so a negative prompt is refused before anything runs."""
    from transformers import PreTrainedTokenizerFast

    from omni_ep.pipelines.hunyuan_image3.inputs import check_inputs

    path = tiny_checkpoint_path("instruct-distil")
    config, tokenizer = HunyuanImage3Config.from_pretrained(path), PreTrainedTokenizerFast.from_pretrained(path)
    distil = HunyuanImage3Variant.from_pretrained(path)
    assert check_inputs(config, tokenizer, ParallelConfig(), distil, "a cat").do_classifier_free_guidance is False
    with pytest.raises(ValueError, match="distilled into its weights and runs no uncond row"):
        check_inputs(config, tokenizer, ParallelConfig(), distil, "a cat", negative_prompt="")
    init_parallel_state(ParallelConfig())
    try:
        pipe = HunyuanImage3Pipeline.from_pretrained(tiny_checkpoint_path("instruct"), torch_dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        prompt, call = "a dog running through snow at night", dict(num_inference_steps=2, seed=3, output_type="latent")
        plain = pipe(prompt, **call).images
        assert torch.equal(pipe(prompt, negative_prompt="", **call).images, plain)
        assert not torch.allclose(pipe(prompt, negative_prompt="a cat", **call).images, plain)
        with pytest.raises(ValueError, match="negative prompt has .* tokens but its prompt has"):
            pipe("a cat", negative_prompt=prompt, **call)
    finally:
        destroy_parallel_state()


def test_cli_runs_distil_with_its_defaults_and_refuses_what_it_cannot_do(tmp_path, capsys, restore_logger):
    from examples.text_to_image.text_to_image import main

    path = tiny_checkpoint_path("instruct-distil")
    out = tmp_path / "distil.png"
    assert main(["--model", path, "--num-inference-steps", "2", "--dtype", "float32", "--output", str(out),
                 "--system-prompt", "Draw well.", "--recaption", "a red cat on a mat"]) == 0
    printed = capsys.readouterr().err  # the CLI logs to stderr
    assert "model: instruct-distil (instruct template), defaults 8 steps, guidance 2.5" in printed
    assert PIL.Image.open(out).size == (256, 256)
    assert main(["--model", path, "--cfg-parallel-size", "2", "--output", str(out)]) == 2
    assert "Use tensor parallel (TP), sequence parallel (SP" in capsys.readouterr().err
    assert main(["--model", path, "--negative-prompt", "blurry", "--output", str(out)]) == 2
    assert "runs no uncond row, so a negative_prompt has nowhere to go" in capsys.readouterr().err
    assert main(["--model", path, "--list-sizes"]) == 0
    sizes = capsys.readouterr().out.split()
    assert len(sizes) == 37 and sizes[16] == "256x256" and sizes[33:] == ["1024x768", "1280x720", "768x1024", "720x1280"]
