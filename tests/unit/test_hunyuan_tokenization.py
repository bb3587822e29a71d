import json

import pytest
import torch
from transformers import AutoTokenizer

from omni_ep.models.hunyuan_image3.tokenization import (
    HunyuanImage3SpecialTokens,
    build_text_to_image_inputs,
    resolution_buckets,
    snap_to_bucket,
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
