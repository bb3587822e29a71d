"""Prompt -> token ids for HunyuanImage-3.0 text-to-image: the base "pretrain" template and the "instruct"
template of HunyuanImage-3.0-Instruct / -Instruct-Distil.

"pretrain" (base), per row (S tokens):
    <bos> {prompt tokens} IMAGE-BLOCK
"instruct" (conversation "hunyuan-image-3": roles User / Assistant, separator "\n\n"):
    <bos> [SYSTEM "\n\n"] "User: " PROMPT "\n\n" "Assistant: " [COT] <answer> IMAGE-BLOCK </answer> "\n\n"
    COT = [<think> THINK </think>] [<recaption> RECAPTION </recaption>], texts a caller supplies (the
    text-generation stage that writes them is not part of omni_ep). Every section is tokenized on its own
    (add_special_tokens=False) and the pieces concatenated: BPE never merges across a section boundary.
IMAGE-BLOCK = <boi> <img_size_{base}> <img_ratio_k> <timestep> [<guidance>] [<timestep_r>] <img> x (h*w) <eoi>,
    the bracketed meta slots present in Instruct-Distil (config ``cfg_distilled`` / ``use_meanflow``).
Classifier-free guidance appends uncond rows: the same sections with every user text (the prompt) and every
CoT text (think, recaption) replaced one-for-one by <cfg>; the system prompt, role prefixes, tags and the image
block are kept. Cond and uncond rows share length, positions and mask. A negative prompt takes the place of the
first <cfg> tokens of the prompt's section in its uncond row (its tokens, then <cfg> up to the prompt's length),
in either template; one longer than its prompt cannot share the row layout and is refused. Special tokens are
resolved BY NAME.

Resolution buckets (base 1024, step 64): from base x base, step height up / width down (and the reverse)
by `step`, clamped to [base/2, 2*base], until both limits are hit; 33 buckets sorted by height/width:
0 = 512x2048, 16 = 1024x1024, 32 = 2048x512 (height x width). The Instruct checkpoints APPEND four buckets
(not re-sorted, absolute sizes as the official code lists them): 33 = 1024x768, 34 = 1280x720, 35 = 768x1024,
36 = 720x1280, and align the stepped buckets to 16. A request snaps to the nearest ratio.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import cache

import torch

BOI, EOI, IMG, CFG, TIMESTEP = "<boi>", "<eoi>", "<img>", "<cfg>", "<timestep>"
NUM_RATIO_TOKENS = 33
# Instruct / Instruct-Distil: meta slots, the answer and CoT tags, the four appended buckets (height, width).
GUIDANCE, TIMESTEP_R = "<guidance>", "<timestep_r>"
ANSWER, END_ANSWER = "<answer>", "</answer>"
THINK, END_THINK, RECAPTION, END_RECAPTION = "<think>", "</think>", "<recaption>", "</recaption>"
EXTRA_BUCKETS = ((1024, 768), (1280, 720), (768, 1024), (720, 1280))
META_SLOT_TOKENS = {"timestep": TIMESTEP, "guidance": GUIDANCE, "timestep_r": TIMESTEP_R}
USER, ASSISTANT, SEPARATOR = "User: ", "Assistant: ", "\n\n"
TEMPLATES = ("pretrain", "instruct")


def image_size_token(base_size: int) -> str:
    return f"<img_size_{base_size}>"


def image_ratio_token(index: int) -> str:
    return f"<img_ratio_{index}>"


def instruct_special_tokens() -> list[str]:
    """The special tokens the Instruct template adds to the base ones."""
    tags = [GUIDANCE, TIMESTEP_R, ANSWER, END_ANSWER, THINK, END_THINK, RECAPTION, END_RECAPTION]
    return tags + [image_ratio_token(NUM_RATIO_TOKENS + k) for k in range(len(EXTRA_BUCKETS))]


@cache
def resolution_buckets(
    base_size: int = 1024, step: int | None = None, align: int = 1, extra: tuple[tuple[int, int], ...] = ()
) -> tuple[tuple[int, int], ...]:
    """(height, width) buckets sorted by height / width (33 entries for step = base_size // 16), each stepped
    size rounded down to a multiple of ``align``; then the ``extra`` buckets appended in order, except one whose
    ratio a bucket already has."""
    step = base_size // 16 if step is None else step
    if step <= 0 or step > base_size // 2:
        raise ValueError(f"step must be in [1, base_size // 2 = {base_size // 2}], got {step}")
    if not 1 <= align <= step or base_size % align:
        raise ValueError(f"align ({align}) must divide base_size ({base_size}) and be at most the step ({step})")
    low, high = base_size // 2, base_size * 2
    buckets = [(base_size, base_size)]
    height = width = base_size
    while not (height >= high and width <= low):  # taller
        height, width = min(height + step, high), max(width - step, low)
        buckets.append((height // align * align, width // align * align))
    height = width = base_size
    while not (height <= low and width >= high):  # wider
        height, width = max(height - step, low), min(width + step, high)
        buckets.append((height // align * align, width // align * align))
    buckets.sort(key=lambda hw: hw[0] / hw[1])
    for h, w in extra:
        if all(h / w != bh / bw for bh, bw in buckets):
            buckets.append((h, w))
    return tuple(buckets)


def snap_to_bucket(
    height: int, width: int, base_size: int = 1024, buckets: tuple[tuple[int, int], ...] | None = None
) -> tuple[int, int, int]:
    """(index, bucket height, bucket width) of the bucket whose height/width is nearest to height/width (the
    first on a tie); ``buckets`` default: the base model's 33 for ``base_size``."""
    if height <= 0 or width <= 0:
        raise ValueError(f"height and width must be positive, got {height}x{width}")
    ratio = height / width
    buckets = resolution_buckets(base_size) if buckets is None else buckets
    index = min(range(len(buckets)), key=lambda i: abs(buckets[i][0] / buckets[i][1] - ratio))
    return index, *buckets[index]


@dataclass(frozen=True)
class HunyuanImage3Template:
    """How a checkpoint lays out its text-to-image sequence: the template, the meta slots of the image block
    (``HunyuanImage3Config.meta_slots``), and the resolution buckets."""

    name: str = "pretrain"  # "pretrain" (base) or "instruct" (Instruct, Instruct-Distil)
    meta_slots: tuple[str, ...] = ("timestep",)

    def __post_init__(self):
        if self.name not in TEMPLATES:
            raise ValueError(f"sequence_template must be one of {', '.join(TEMPLATES)}, got {self.name!r}")
        if self.meta_slots[:1] != ("timestep",) or not set(self.meta_slots) <= set(META_SLOT_TOKENS):
            raise ValueError(f"meta_slots must start with 'timestep' and name {tuple(META_SLOT_TOKENS)}, got {self.meta_slots}")

    def buckets(self, base_size: int) -> tuple[tuple[int, int], ...]:
        """37 buckets for "instruct" (aligned to 16, four appended), the base 33 for "pretrain"."""
        if self.name == "instruct":
            return resolution_buckets(base_size, align=16, extra=EXTRA_BUCKETS)
        return resolution_buckets(base_size)

    def snap(self, height: int, width: int, base_size: int) -> tuple[int, int, int]:
        return snap_to_bucket(height, width, base_size, self.buckets(base_size))


def token_id(tokenizer, name: str) -> int:
    """The id of special token ``name``; a ValueError naming it when the tokenizer lacks it."""
    token_id = tokenizer.convert_tokens_to_ids(name)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ValueError(f"tokenizer has no special token {name!r}; use the HunyuanImage-3.0 tokenizer")
    return token_id


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
            return token_id(tokenizer, name)

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
    timestep_index: position of <timestep>; the other meta slots (``meta_slots``) follow it, then the image.
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
    meta_slots: tuple[str, ...] = ("timestep",)

    def slot_index(self, name: str) -> int:
        """Position of meta slot ``name`` ("timestep", "guidance", "timestep_r")."""
        if name not in self.meta_slots:
            raise ValueError(f"this sequence has no <{name}> slot (meta slots {self.meta_slots})")
        return self.timestep_index + self.meta_slots.index(name)


def build_text_to_image_inputs(
    tokenizer,
    prompts: list[str],
    height: int,
    width: int,
    guidance: bool,
    base_size: int = 1024,
    vae_downsample: int = 16,
    template: HunyuanImage3Template | None = None,
    system_prompt: str | None = None,
    think: str | None = None,
    recaption: str | None = None,
    negative_prompts: list[str] | None = None,
) -> TextToImageInputs:
    """Token ids for prompts at the bucket nearest to height x width, in ``template``'s layout (default: the
    base model's "pretrain"). system_prompt, think, recaption: "instruct" only; empty or None leaves the
    section out.

    All prompts must tokenize to the same length (one shared layout); run prompts of different lengths
    in separate calls. height, width of the result are the bucket's; latent grid = bucket // vae_downsample.
    negative_prompts (one per prompt, with guidance): the text of each uncond row, padded with <cfg> tokens.
    """
    template = template or HunyuanImage3Template()
    if isinstance(prompts, str) or not prompts:
        raise ValueError("prompts must be a non-empty list of strings")
    if template.name == "pretrain" and (system_prompt or think or recaption):
        raise ValueError("the pretrain template (base model) has no system prompt, think or recaption section")
    special = HunyuanImage3SpecialTokens.from_tokenizer(tokenizer, base_size)
    ratio_index, bucket_h, bucket_w = template.snap(height, width, base_size)
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
    image_tokens = latent_h * latent_w
    ratio_token = token_id(tokenizer, image_ratio_token(ratio_index))
    slots = [token_id(tokenizer, META_SLOT_TOKENS[name]) for name in template.meta_slots]
    image_block = [special.boi, special.image_size, ratio_token, *slots, *[special.img] * image_tokens, special.eoi]
    head, tail, after = _template_sections(tokenizer, template.name, system_prompt, think, recaption)

    def row(prompt_section: list[int], cond: bool) -> list[int]:
        """<bos>, the sections, the image block, what follows it. prompt_section: the prompt's tokens, or in an
        uncond row the negative prompt's padded with <cfg>; an uncond row also has <cfg> for every CoT token."""
        ids = [special.bos]
        for section, is_cot in [*head, (prompt_section, False), *tail]:
            ids += [special.cfg] * len(section) if is_cot and not cond else section
        return ids + image_block + after

    rows = [row(ids, cond=True) for ids in prompt_ids]
    if guidance:
        negatives = negative_prompts if negative_prompts is not None else [""] * len(prompts)
        if len(negatives) != len(prompts):
            raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts; give one per prompt")
        for ids, text in zip(prompt_ids, negatives):
            negative = tokenizer.encode(text, add_special_tokens=False)
            if len(negative) > len(ids):
                raise ValueError(negative_prompt_too_long(len(negative), len(ids)))
            rows.append(row(negative + [special.cfg] * (len(ids) - len(negative)), cond=False))
    timestep_index = len(rows[0]) - len(after) - len(image_block) + 3  # after <boi> <img_size> <img_ratio>
    image_start = timestep_index + len(slots)
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
        meta_slots=template.meta_slots,
    )


def template_token_count(tokenizer, template: HunyuanImage3Template, system_prompt: str | None = None,
                         think: str | None = None, recaption: str | None = None) -> int:
    """Tokens of a row besides the prompt's and the <img> tokens (6 in "pretrain": <bos>, <boi>, <img_size>,
    <img_ratio>, <timestep>, <eoi>): what ``build_text_to_image_inputs`` adds, counted without building a row."""
    head, tail, after = _template_sections(tokenizer, template.name, system_prompt, think, recaption)
    image_block = 3 + len(template.meta_slots) + 1  # <boi> <img_size> <img_ratio> SLOTS ... <eoi>
    return 1 + sum(len(section) for section, _ in head + tail) + image_block + len(after)


def _template_sections(tokenizer, name, system_prompt, think, recaption):
    """(sections before the prompt, sections between the prompt and the image block, ids after the image block)
    of template ``name``. A section is (ids, is_cot): is_cot marks a CoT text, which an uncond row replaces by
    <cfg> as it does the prompt. "pretrain" has nothing but the prompt."""
    if name == "pretrain":
        return [], [], []

    def text(s: str) -> list[int]:
        return tokenizer.encode(s, add_special_tokens=False)

    def tag(name: str) -> list[int]:
        return [token_id(tokenizer, name)]

    system = (system_prompt or "").strip()
    head = [(text(system), False), (text(SEPARATOR), False)] if system else []
    head += [(text(USER), False)]
    tail = [(text(SEPARATOR), False), (text(ASSISTANT), False)]
    for open_tag, body, close_tag in ((THINK, think, END_THINK), (RECAPTION, recaption, END_RECAPTION)):
        if body:
            tail += [(tag(open_tag), False), (text(body), True), (tag(close_tag), False)]
    tail += [(tag(ANSWER), False)]
    return head, tail, tag(END_ANSWER) + text(SEPARATOR)


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
    instruct: bool = False,
    corpus: tuple[str, ...] = _TINY_CORPUS,
) -> None:
    """Write a small real HF fast tokenizer (tokenizer.json, tokenizer_config.json, special_tokens_map.json).

    Byte-level BPE trained offline on ``corpus`` (lowercased), so any text tokenizes; holds bos/eos/pad and
    every special token the text-to-image template resolves by name, with <img_size_s> for each image_base_sizes;
    with ``instruct`` also those of the Instruct template (``instruct_special_tokens``), after the base ones.
    Loadable with transformers.AutoTokenizer.from_pretrained(directory).
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bos, eos, pad = "<|startoftext|>", "<|endoftext|>", "<pad>"
    extra = [BOI, EOI, IMG, CFG, TIMESTEP, *map(image_size_token, image_base_sizes)]
    extra += [image_ratio_token(k) for k in range(NUM_RATIO_TOKENS)]
    extra += instruct_special_tokens() if instruct else []
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
