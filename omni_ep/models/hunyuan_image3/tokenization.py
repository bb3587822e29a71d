"""Prompt -> token ids for HunyuanImage-3.0 text-to-image ("pretrain" template, no system prompt).

Sequence, per row (S tokens):
    <bos> {prompt tokens} <boi> <img_size_{base}> <img_ratio_k> <timestep> <img> x (h*w) <eoi>
Classifier-free guidance appends uncond rows: the same template with every prompt token replaced one-for-one
by <cfg>, so cond and uncond rows share length, positions and mask. A negative prompt takes the place of the
first <cfg> tokens of its uncond row (its tokens, then <cfg> up to the prompt's length); one longer than its
prompt cannot share the row layout and is refused. Special tokens are resolved BY NAME.

Resolution buckets (base 1024, step 64): from base x base, step height up / width down (and the reverse)
by `step`, clamped to [base/2, 2*base], until both limits are hit; 33 buckets sorted by height/width:
0 = 512x2048, 16 = 1024x1024, 32 = 2048x512 (height x width). A request snaps to the nearest ratio.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import cache

import torch

BOI, EOI, IMG, CFG, TIMESTEP = "<boi>", "<eoi>", "<img>", "<cfg>", "<timestep>"
NUM_RATIO_TOKENS = 33


def image_size_token(base_size: int) -> str:
    return f"<img_size_{base_size}>"


def image_ratio_token(index: int) -> str:
    return f"<img_ratio_{index}>"


@cache
def resolution_buckets(base_size: int = 1024, step: int | None = None) -> tuple[tuple[int, int], ...]:
    """(height, width) buckets sorted by height / width; 33 entries for step = base_size // 16."""
    step = base_size // 16 if step is None else step
    if step <= 0 or step > base_size // 2:
        raise ValueError(f"step must be in [1, base_size // 2 = {base_size // 2}], got {step}")
    low, high = base_size // 2, base_size * 2
    buckets = [(base_size, base_size)]
    height = width = base_size
    while not (height >= high and width <= low):  # taller
        height, width = min(height + step, high), max(width - step, low)
        buckets.append((height, width))
    height = width = base_size
    while not (height <= low and width >= high):  # wider
        height, width = max(height - step, low), min(width + step, high)
        buckets.append((height, width))
    return tuple(sorted(buckets, key=lambda hw: hw[0] / hw[1]))


def snap_to_bucket(height: int, width: int, base_size: int = 1024) -> tuple[int, int, int]:
    """(index, bucket height, bucket width) of the bucket whose height/width is nearest to height/width."""
    if height <= 0 or width <= 0:
        raise ValueError(f"height and width must be positive, got {height}x{width}")
    ratio = height / width
    buckets = resolution_buckets(base_size)
    index = min(range(len(buckets)), key=lambda i: abs(buckets[i][0] / buckets[i][1] - ratio))
    return index, *buckets[index]


@dataclass(frozen=True)
class HunyuanImage3SpecialTokens:
    """Ids of the special tokens the text-to-image template uses, looked up by name."""

    bos: int
    eos: int
    pad: int
    boi: int
    eoi: int
    img: int
    cfg: int
    timestep: int
    image_size: int
    image_ratios: tuple[int, ...]  # [33], index k -> <img_ratio_k>

    @classmethod
    def from_tokenizer(cls, tokenizer, base_size: int = 1024) -> HunyuanImage3SpecialTokens:
        def lookup(name: str) -> int:
            token_id = tokenizer.convert_tokens_to_ids(name)
            if token_id is None or token_id == tokenizer.unk_token_id:
                raise ValueError(f"tokenizer has no special token {name!r}; use the HunyuanImage-3.0 tokenizer")
            return token_id

        def required(value: int | None, name: str) -> int:
            if value is None:
                raise ValueError(f"tokenizer defines no {name} token; use the HunyuanImage-3.0 tokenizer")
            return value

        return cls(
            bos=required(tokenizer.bos_token_id, "bos"),
            eos=required(tokenizer.eos_token_id, "eos"),
            pad=required(tokenizer.pad_token_id, "pad"),
            boi=lookup(BOI),
            eoi=lookup(EOI),
            img=lookup(IMG),
            cfg=lookup(CFG),
            timestep=lookup(TIMESTEP),
            image_size=lookup(image_size_token(base_size)),
            image_ratios=tuple(lookup(image_ratio_token(k)) for k in range(NUM_RATIO_TOKENS)),
        )


def negative_prompt_too_long(negative_tokens: int, prompt_tokens: int) -> str:
    return (
        f"the negative prompt has {negative_tokens} tokens but its prompt has {prompt_tokens}; the uncond row takes the "
        "prompt's place token for token (both rows share positions, mask and KV cache), so shorten the negative "
        "prompt or lengthen the prompt"
    )


@dataclass(frozen=True)
class TextToImageInputs:
    """Token layout of one text-to-image batch.

    input_ids: [R, S] int64, R = B cond rows, then B uncond rows when guidance is on.
    image_slice: (start, end) of the <img> tokens, end exclusive; end - start = latent_height * latent_width.
    timestep_index: position of <timestep>.
    """

    input_ids: torch.Tensor
    image_slice: tuple[int, int]
    timestep_index: int
    latent_height: int
    latent_width: int
    height: int
    width: int
    ratio_index: int
    guidance: bool


def build_text_to_image_inputs(
    tokenizer,
    prompts: list[str],
    height: int,
    width: int,
    guidance: bool,
    base_size: int = 1024,
    vae_downsample: int = 16,
    negative_prompts: list[str] | None = None,
) -> TextToImageInputs:
    """Token ids for prompts at the bucket nearest to height x width.

    All prompts must tokenize to the same length (one shared layout); run prompts of different lengths
    in separate calls. height, width of the result are the bucket's; latent grid = bucket // vae_downsample.
    negative_prompts (one per prompt, with guidance): the text of each uncond row, padded with <cfg> tokens.
    """
    if isinstance(prompts, str) or not prompts:
        raise ValueError("prompts must be a non-empty list of strings")
    special = HunyuanImage3SpecialTokens.from_tokenizer(tokenizer, base_size)
    ratio_index, bucket_h, bucket_w = snap_to_bucket(height, width, base_size)
    latent_h, latent_w = bucket_h // vae_downsample, bucket_w // vae_downsample
    if latent_h == 0 or latent_w == 0:
        raise ValueError(f"bucket {bucket_h}x{bucket_w} is smaller than vae_downsample={vae_downsample}")

    prompt_ids = [tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    lengths = {len(ids) for ids in prompt_ids}
    if len(lengths) != 1:
        raise ValueError(
            f"prompts tokenize to different lengths {sorted(lengths)}; one batch shares one layout, "
            "so pass prompts of equal token length or run them in separate calls"
        )
    (num_prompt_tokens,) = lengths
    image_tokens = latent_h * latent_w
    head = [special.boi, special.image_size, special.image_ratios[ratio_index], special.timestep]
    tail = [special.img] * image_tokens + [special.eoi]

    def row(text_ids: list[int]) -> list[int]:
        return [special.bos, *text_ids, *head, *tail]

    rows = [row(ids) for ids in prompt_ids]
    if guidance:
        negatives = negative_prompts if negative_prompts is not None else [""] * len(prompts)
        if len(negatives) != len(prompts):
            raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts; give one per prompt")
        for text in negatives:
            ids = tokenizer.encode(text, add_special_tokens=False)
            if len(ids) > num_prompt_tokens:
                raise ValueError(negative_prompt_too_long(len(ids), num_prompt_tokens))
            rows.append(row(ids + [special.cfg] * (num_prompt_tokens - len(ids))))
    timestep_index = 1 + num_prompt_tokens + len(head) - 1
    image_start = timestep_index + 1
    return TextToImageInputs(
        input_ids=torch.tensor(rows, dtype=torch.int64),
        image_slice=(image_start, image_start + image_tokens),
        timestep_index=timestep_index,
        latent_height=latent_h,
        latent_width=latent_w,
        height=bucket_h,
        width=bucket_w,
        ratio_index=ratio_index,
        guidance=guidance,
    )


_TINY_CORPUS = (
    "a photo of a cat sitting on a red chair in the sun",
    "a painting of a dog running through snow at night",
    "an astronaut riding a horse on the moon, digital art",
    "a bowl of fruit with apples, oranges and bananas on a wooden table",
    "a city street in the rain with neon lights and people walking",
)


def write_tiny_tokenizer(
    directory: str | os.PathLike,
    vocab_size: int = 512,
    image_base_sizes: tuple[int, ...] = (64, 128, 256, 512, 1024),
    corpus: tuple[str, ...] = _TINY_CORPUS,
) -> None:
    """Write a small real HF fast tokenizer (tokenizer.json, tokenizer_config.json, special_tokens_map.json).

    Byte-level BPE trained offline on ``corpus`` (lowercased), so any text tokenizes; holds bos/eos/pad and
    every special token the text-to-image template resolves by name, with <img_size_s> for each image_base_sizes.
    Loadable with transformers.AutoTokenizer.from_pretrained(directory).
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bos, eos, pad = "<|startoftext|>", "<|endoftext|>", "<pad>"
    extra = [BOI, EOI, IMG, CFG, TIMESTEP, *map(image_size_token, image_base_sizes)]
    extra += [image_ratio_token(k) for k in range(NUM_RATIO_TOKENS)]
    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[bos, eos, pad, *extra],
        show_progress=False,
    )
    backend.train_from_iterator(corpus, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=bos, eos_token=eos, pad_token=pad, additional_special_tokens=extra
    )
    tokenizer.save_pretrained(directory)
    special_map = {"bos_token": bos, "eos_token": eos, "pad_token": pad, "additional_special_tokens": extra}
    with open(os.path.join(directory, "special_tokens_map.json"), "w") as f:
        json.dump(special_map, f, indent=2)
