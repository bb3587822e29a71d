import json

import pytest
import torch
from transformers import AutoTokenizer

from omni_ep.models.hunyuan_image3.tokenization import (
    HunyuanImage3SpecialTokens,
    HunyuanImage3Template,
    build_text_to_image_inputs,
    resolution_buckets,
    snap_to_bucket,
    template_token_count,
    write_tiny_tokenizer,
)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny_tokenizer")
    write_tiny_tokenizer(directory)
    return AutoTokenizer.from_pretrained(directory)


def test_bucket_anchors():
    buckets = resolution_buckets(1024)
    assert len(buckets) == 33
    assert buckets[0] == (512, 2048) and buckets[16] == (1024, 1024) and buckets[32] == (2048, 512)
    # hand-derived: one 64-step from square each way; the width clamps at 512 after 8 steps.
    assert buckets[15] == (960, 1088) and buckets[17] == (1088, 960)
    assert buckets[8] == (512, 1536) and buckets[24] == (1536, 512) and buckets[25] == (1600, 512)
    ratios = [h / w for h, w in buckets]
    assert ratios == sorted(ratios) and len(set(ratios)) == 33
    tokens = [(h // 16) * (w // 16) for h, w in buckets]
    assert max(tokens) == 4096 == tokens[16] and tokens[0] == 32 * 128 and tokens[15] == 60 * 68
    assert all(h % 64 == 0 and w % 64 == 0 for h, w in buckets)


def test_snap_to_nearest_ratio():
    assert snap_to_bucket(1024, 1024) == (16, 1024, 1024)
    # 768/1360 = 0.565: 768x1280 (0.600, off 0.035) beats 704x1344 (0.524, off 0.041).
    assert snap_to_bucket(768, 1360) == (12, 768, 1280)
    assert snap_to_bucket(2000, 500) == (32, 2048, 512)
    assert snap_to_bucket(1, 1000) == (0, 512, 2048)
    assert snap_to_bucket(64, 64, base_size=64) == (16, 64, 64)
    with pytest.raises(ValueError, match="positive"):
        snap_to_bucket(0, 10)


def test_tiny_tokenizer_files_and_specials(tokenizer, tmp_path):
    write_tiny_tokenizer(tmp_path)
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= {p.name for p in tmp_path.iterdir()}
    assert "<img_ratio_32>" in json.loads((tmp_path / "special_tokens_map.json").read_text())["additional_special_tokens"]
    special = HunyuanImage3SpecialTokens.from_tokenizer(tokenizer)
    ids = [special.bos, special.eos, special.pad, special.boi, special.eoi, special.img, special.cfg, special.timestep]
    ids += [special.image_size, *special.image_ratios]
    assert len(set(ids)) == len(ids) == 8 + 1 + 33
    assert tokenizer.convert_ids_to_tokens(special.image_ratios[7]) == "<img_ratio_7>"
    # any text tokenizes (byte fallback) and decodes back, lowercased
    text = "A Zebra, 猫 & émigré!"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text.lower()
    assert tokenizer.encode("<boi>", add_special_tokens=False) == [special.boi]


def test_text_to_image_layout_with_guidance(tokenizer):
    special = HunyuanImage3SpecialTokens.from_tokenizer(tokenizer, base_size=64)
    prompt = "a cat on a chair"
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    n = len(prompt_ids)
    out = build_text_to_image_inputs(tokenizer, [prompt], 32, 128, guidance=True, base_size=64)
    # bucket 0 of base 64 is 32x128 -> latent grid 2x8 = 16 <img> tokens.
    assert (out.ratio_index, out.height, out.width, out.latent_height, out.latent_width) == (0, 32, 128, 2, 8)
    head = [special.boi, special.image_size, special.image_ratios[0], special.timestep]
    tail = [special.img] * 16 + [special.eoi]
    assert out.input_ids.dtype == torch.int64 and out.input_ids.shape == (2, 1 + n + 4 + 16 + 1)
    assert out.input_ids[0].tolist() == [special.bos, *prompt_ids, *head, *tail]
    assert out.input_ids[1].tolist() == [special.bos, *[special.cfg] * n, *head, *tail]
    assert out.timestep_index == n + 4 and out.input_ids[0, out.timestep_index] == special.timestep
    assert out.image_slice == (n + 5, n + 21)
    start, end = out.image_slice
    assert (out.input_ids[:, start:end] == special.img).all() and out.input_ids[0, end] == special.eoi


def test_batch_rows_cond_then_uncond(tokenizer):
    prompts = ["a red cat", "a red dog"]
    assert len({len(tokenizer.encode(p, add_special_tokens=False)) for p in prompts}) == 1
    out = build_text_to_image_inputs(tokenizer, prompts, 1024, 1024, guidance=True)
    assert out.input_ids.shape[0] == 4 and out.latent_height == out.latent_width == 64
    assert out.image_slice[1] - out.image_slice[0] == 4096
    assert torch.equal(out.input_ids[2], out.input_ids[3])
    assert not torch.equal(out.input_ids[0], out.input_ids[1])
    no_cfg = build_text_to_image_inputs(tokenizer, prompts, 1024, 1024, guidance=False)
    assert torch.equal(no_cfg.input_ids, out.input_ids[:2])


def test_bad_inputs(tokenizer):
    with pytest.raises(ValueError, match="different lengths"):
        build_text_to_image_inputs(tokenizer, ["a cat", "a very long prompt about many things"], 64, 64, True, 64)
    with pytest.raises(ValueError, match="img_size_2048"):
        build_text_to_image_inputs(tokenizer, ["a cat"], 64, 64, True, base_size=2048)
    with pytest.raises(ValueError, match="list"):
        build_text_to_image_inputs(tokenizer, "a cat", 64, 64, True)


def test_negative_prompt_takes_the_place_of_the_first_cfg_tokens(tokenizer):
    special = HunyuanImage3SpecialTokens.from_tokenizer(tokenizer, 64)
    prompt, negative = "a photo of a cat sitting on a red chair", "a dog"
    n, m = (len(tokenizer.encode(t, add_special_tokens=False)) for t in (prompt, negative))
    assert m < n
    out = build_text_to_image_inputs(tokenizer, [prompt], 64, 64, True, 64, negative_prompts=[negative])
    plain = build_text_to_image_inputs(tokenizer, [prompt], 64, 64, True, 64)
    cond, uncond = out.input_ids.tolist()
    assert cond == plain.input_ids[0].tolist() and len(uncond) == len(cond)  # one layout for both rows
    assert uncond[1 : 1 + m] == tokenizer.encode(negative, add_special_tokens=False)
    assert uncond[1 + m : 1 + n] == [special.cfg] * (n - m) and uncond[1 + n :] == cond[1 + n :]
    empty = build_text_to_image_inputs(tokenizer, [prompt], 64, 64, True, 64, negative_prompts=[""])
    assert torch.equal(empty.input_ids, plain.input_ids)  # "" is the official all-<cfg> row
    with pytest.raises(ValueError, match="negative prompt has .* tokens but its prompt has"):
        build_text_to_image_inputs(tokenizer, ["a cat"], 64, 64, True, 64, negative_prompts=[prompt])


# ---- the Instruct template -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def instruct_tokenizer(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny_instruct_tokenizer")
    write_tiny_tokenizer(directory, instruct=True)
    return AutoTokenizer.from_pretrained(directory)


DISTIL = HunyuanImage3Template("instruct", ("timestep", "guidance", "timestep_r"))


def test_instruct_buckets_append_four_and_snap_by_ratio():
    buckets = DISTIL.buckets(1024)
    assert len(buckets) == 37 and buckets[:33] == resolution_buckets(1024)  # aligning to 16 changes nothing at 1024
    assert buckets[33:] == ((1024, 768), (1280, 720), (768, 1024), (720, 1280))  # appended, not re-sorted
    assert DISTIL.snap(1080, 1920, 1024) == (36, 720, 1280)  # 0.5625 is exactly 720/1280
    assert DISTIL.snap(1024, 1024, 1024) == (16, 1024, 1024)
    assert DISTIL.snap(768, 1024, 1024) == (35, 768, 1024)
    # the base model's 33 buckets: the nearest ratios are 896x1152 (0.778) and 768x1280 (0.600)
    assert snap_to_bucket(768, 1024) == (14, 896, 1152) and snap_to_bucket(1080, 1920) == (12, 768, 1280)
    with pytest.raises(ValueError, match="align"):
        resolution_buckets(64, align=16)


def test_instruct_distil_template_known_ids(instruct_tokenizer):
    """<bos> SYSTEM "\\n\\n" "User: " PROMPT "\\n\\n" "Assistant: " <recaption> R </recaption> <answer>
    <boi> <img_size_256> <img_ratio_16> <timestep> <guidance> <timestep_r> <img> x 256 <eoi> </answer> "\\n\\n",
    ids of the tiny tokenizer (seed-free: BPE trained on a fixed corpus)."""
    out = build_text_to_image_inputs(instruct_tokenizer, ["a cat"], 256, 256, guidance=True, base_size=256,
                                     template=DISTIL, system_prompt="  be brief\n", recaption="a red cat on a mat")
    system, sep, user, prompt = [123, 126, 343, 139, 130, 126, 127], [256, 256], [142, 140, 126, 139, 83, 278], [122, 410]
    assistant, recaption = [353, 140, 130, 140, 141, 320, 141, 83, 278], [122, 400, 410, 331, 314, 278, 134, 354]
    image_block = [3, 10, 29, 7, 46, 47] + [5] * 256 + [4]
    cond = [0, *system, *sep, *user, *prompt, *sep, *assistant, 52, *recaption, 53, 48, *image_block, 49, *sep]
    uncond = [0, *system, *sep, *user, 6, 6, *sep, *assistant, 52, *[6] * 8, 53, 48, *image_block, 49, *sep]
    assert out.input_ids.tolist() == [cond, uncond] and out.input_ids.shape == (2, 306)
    assert out.timestep_index == 43 and out.slot_index("guidance") == 44 and out.slot_index("timestep_r") == 45
    assert out.image_slice == (46, 302) and (out.ratio_index, out.height, out.latent_height) == (16, 256, 16)
    # per section: "User: " + "a cat" tokenized apart is not the joined string's tokenization
    assert instruct_tokenizer.encode("User: a cat", add_special_tokens=False) != user + prompt


def test_instruct_template_without_system_prompt_or_cot(instruct_tokenizer):
    instruct = HunyuanImage3Template("instruct")
    out = build_text_to_image_inputs(instruct_tokenizer, ["a cat"], 256, 256, guidance=False, base_size=256,
                                     template=instruct, system_prompt="", think="")
    assert out.input_ids[0, :10].tolist() == [0, 142, 140, 126, 139, 83, 278, 122, 410, 256]
    assert out.timestep_index == 1 + 6 + 2 + 2 + 9 + 1 + 3 == 24 and out.image_slice == (25, 281)
    with pytest.raises(ValueError, match="no <guidance> slot"):
        out.slot_index("guidance")
    with_think = build_text_to_image_inputs(instruct_tokenizer, ["a cat"], 256, 256, guidance=True, base_size=256,
                                            template=instruct, think="x", recaption="y")
    row = with_think.input_ids[0].tolist()
    assert row[20:28] == [50, *instruct_tokenizer.encode("x", add_special_tokens=False), 51, 52,
                          *instruct_tokenizer.encode("y", add_special_tokens=False), 53, 48, 3]
    with pytest.raises(ValueError, match="pretrain template"):
        build_text_to_image_inputs(instruct_tokenizer, ["a cat"], 256, 256, False, 256, recaption="y")


def test_instruct_negative_prompt_takes_the_prompts_place_and_cot_stays_cfg(instruct_tokenizer):
    """The Instruct uncond row: system prompt and roles kept, the negative prompt then <cfg> in the prompt's
    section, <cfg> for the CoT text; the same length as the cond row."""
    prompt, negative = "a photo of a cat sitting on a red chair", "a dog"
    kwargs = dict(base_size=256, template=DISTIL, system_prompt="be brief", recaption="a red cat")
    out = build_text_to_image_inputs(instruct_tokenizer, [prompt], 256, 256, True, negative_prompts=[negative],
                                     **kwargs)
    plain = build_text_to_image_inputs(instruct_tokenizer, [prompt], 256, 256, True, **kwargs)
    cond, uncond = out.input_ids.tolist()
    n = len(instruct_tokenizer.encode(prompt, add_special_tokens=False))
    neg = instruct_tokenizer.encode(negative, add_special_tokens=False)
    start = 1 + 7 + 2 + 6  # <bos> "be brief" "\n\n" "User: " (ids of test_instruct_distil_template_known_ids)
    assert cond == plain.input_ids[0].tolist() and len(uncond) == len(cond)
    assert uncond[:start] == cond[:start] and uncond[start : start + len(neg)] == neg
    assert uncond[start + len(neg) : start + n] == [6] * (n - len(neg))  # <cfg> up to the prompt's length
    assert uncond[start + n :] == plain.input_ids[1, start + n :].tolist()  # CoT still <cfg>, the rest as cond
    assert template_token_count(instruct_tokenizer, DISTIL, "be brief", recaption="a red cat") == (
        out.input_ids.shape[1] - n - 16 * 16)
    with pytest.raises(ValueError, match="negative prompt has .* tokens but its prompt has"):
        build_text_to_image_inputs(instruct_tokenizer, ["a cat"], 256, 256, True, negative_prompts=[prompt], **kwargs)


def test_template_token_count_of_the_base_template(tokenizer):
    out = build_text_to_image_inputs(tokenizer, ["a cat"], 64, 64, False, 64)
    n = len(tokenizer.encode("a cat", add_special_tokens=False))
    assert template_token_count(tokenizer, HunyuanImage3Template()) == 6 == out.input_ids.shape[1] - n - 4 * 4
