"""The checks and defaults of one text-to-image call, needing no weight (config.json, generation_config.json, the
tokenizer, the layout).

Kept apart from the pipeline (and from diffusers, whose import alone takes seconds), so a launcher checks a
request before it loads anything: ``check_inputs`` gives the same answer on every rank, and raises a ValueError
that says what to change. The checkpoint's variant (``variant.py``: base, Instruct, Instruct-Distil) supplies the
defaults of steps / guidance / shift, the template (its buckets, its text around the prompt) and whether a step
runs the [cond; uncond] batch; a layout it cannot use (CFG parallel on a distilled checkpoint) is refused here too.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from omni_ep.config import ParallelConfig
from omni_ep.models.hunyuan_image3.configuration import HunyuanImage3Config
from omni_ep.models.hunyuan_image3.tokenization import negative_prompt_too_long, template_token_count
from omni_ep.pipelines.hunyuan_image3.variant import HunyuanImage3Variant

logger = logging.getLogger(__name__)

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
CALLBACK_TENSOR_INPUTS = ("latents", "noise_pred")  # what callback_on_step_end may ask for
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_dtype(device: torch.device | str) -> torch.dtype:
    """The weights' dtype when none is given: fp32 on a CPU (bf16 matmuls are slow there), bf16 elsewhere."""
    return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16


def vae_dtype_for(device: torch.device | str, dtype: torch.dtype) -> torch.dtype:
    """The VAE decoder's dtype: fp32 on a CPU (a bf16 decode there takes minutes instead of seconds), else dtype."""
    return torch.float32 if torch.device(device).type == "cpu" else dtype


@dataclass(frozen=True)
class TextToImageRequest:
    """One call's inputs, checked and resolved: what the denoising loop runs. height x width is the bucket made."""

    prompts: list[str]
    negative_prompts: list[str] | None  # one per prompt, None: all-<cfg> uncond rows
    num_images_per_prompt: int
    height: int
    width: int
    requested_size: tuple[int, int]
    sigmas: list[float]  # N unshifted sigmas; the schedule shifts them by flow_shift
    guidance_scale: float
    do_classifier_free_guidance: bool  # rows [cond; uncond]: guidance_scale > 1, never on a distilled checkpoint
    flow_shift: float
    prompt_tokens: list[int]  # token count of each prompt
    # the text around the prompt (``variant.text_sections``: system_prompt, think, recaption); {} for "pretrain"
    sections: dict[str, str | None] = field(default_factory=dict)

    @property
    def num_inference_steps(self) -> int:
        return len(self.sigmas)

    @property
    def num_images(self) -> int:
        return len(self.prompts) * self.num_images_per_prompt


def check_inputs(
    config: HunyuanImage3Config,
    tokenizer,
    parallel_config: ParallelConfig,
    variant: HunyuanImage3Variant,
    prompt: str | list[str],
    height: int | None = None,
    width: int | None = None,
    num_inference_steps: int | None = None,
    sigmas: list[float] | None = None,
    guidance_scale: float | None = None,
    negative_prompt: str | list[str] | None = None,
    num_images_per_prompt: int = 1,
    seed: int | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    latents: torch.Tensor | None = None,
    output_type: str = "pil",
    callback_on_step_end_tensor_inputs: list[str] | tuple[str, ...] = ("latents",),
    flow_shift: float | None = None,
    system_prompt: str | None = None,
    think: str | None = None,
    recaption: str | None = None,
) -> TextToImageRequest:
    """Check a call and fill in its defaults (``variant.defaults``); raise a ValueError saying what to change.

    Needs no weight (config.json, generation_config.json, the tokenizer, the layout), and gives the same answer on
    every rank, so it runs before loading (in a launcher) and before any collective (in ``__call__``).
    """
    variant.check_parallel_config(parallel_config)
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("prompt must be a string or a non-empty list of strings")
    if not all(isinstance(p, str) for p in prompts):
        raise ValueError("every prompt must be a string")
    negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else negative_prompt
    if negatives is not None:
        if not isinstance(negatives, (list, tuple)) or not all(isinstance(p, str) for p in negatives):
            raise ValueError("negative_prompt must be a string or a list of strings")
        if len(negatives) != len(prompts):
            raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts; give one per prompt")
    if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
        raise ValueError(f"num_images_per_prompt must be an integer >= 1, got {num_images_per_prompt!r}")

    factor, base = config.vae_downsample_factor[0], config.image_base_size
    height, width = base if height is None else height, base if width is None else width
    if height % factor or width % factor or height <= 0 or width <= 0:
        raise ValueError(f"height and width must be positive multiples of {factor}, got {height}x{width}")
    _, bucket_h, bucket_w = variant.template.snap(height, width, base)

    if sigmas is not None:
        sigmas = [float(s) for s in sigmas]
        if not sigmas or any(not 0 < s <= 1 for s in sigmas) or any(a <= b for a, b in zip(sigmas, sigmas[1:])):
            raise ValueError(f"sigmas must be a non-empty, strictly decreasing list in (0, 1], got {sigmas}")
        if num_inference_steps is not None and num_inference_steps != len(sigmas):
            raise ValueError(f"num_inference_steps={num_inference_steps} but {len(sigmas)} sigmas; give one of them")
        num_inference_steps = len(sigmas)
    num_inference_steps, guidance_scale, shift = variant.defaults(num_inference_steps, guidance_scale, flow_shift)
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
    if sigmas is None:
        sigmas = np.linspace(1.0, 0.0, num_inference_steps + 1)[:-1].tolist()

    do_cfg = variant.does_cfg(guidance_scale)
    if negatives is not None and variant.cfg_distilled:
        raise ValueError(
            f"this checkpoint ({variant.name}) has guidance distilled into its weights and runs no uncond row, so a "
            "negative_prompt has nowhere to go; leave it out (guidance_scale still sets the distilled guidance)"
        )
    sections = variant.text_sections(system_prompt, think, recaption)
    if parallel_config.cfg_parallel_size == 2 and guidance_scale <= 1.0:
        raise ValueError(
            f"cfg_parallel_size=2 runs one guidance branch per rank and needs guidance_scale > 1 "
            f"(got {guidance_scale}); use cfg_parallel_size=1 without guidance"
        )
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
    unknown = [name for name in callback_on_step_end_tensor_inputs if name not in CALLBACK_TENSOR_INPUTS]
    if unknown:
        raise ValueError(f"callback_on_step_end_tensor_inputs {unknown} unknown; choose from {CALLBACK_TENSOR_INPUTS}")

    num_images = len(prompts) * num_images_per_prompt
    if seed is not None and generator is not None:
        raise ValueError("pass seed or generator, not both")
    if isinstance(generator, (list, tuple)):
        if len(generator) != num_images:
            raise ValueError(
                f"{len(generator)} generators for {num_images} images ({len(prompts)} prompts x "
                f"num_images_per_prompt={num_images_per_prompt}); give one per image, or a single generator"
            )
        if not all(isinstance(g, torch.Generator) for g in generator):
            raise ValueError("generator must be a torch.Generator or a list of them")
    elif generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or a list of them, got {type(generator).__name__}")
    latent_shape = (num_images, config.latent_channels, bucket_h // factor, bucket_w // factor)
    if latents is not None and tuple(latents.shape) != latent_shape:
        raise ValueError(
            f"latents must be [images, C, h, w] = {list(latent_shape)} for {num_images} images of "
            f"{bucket_h}x{bucket_w}, got {list(latents.shape)}"
        )

    image_tokens = (bucket_h // factor) * (bucket_w // factor)
    template_tokens = template_token_count(tokenizer, variant.template, **sections)
    limit = config.max_position_embeddings - image_tokens - template_tokens
    prompt_tokens = [len(tokenizer.encode(p, add_special_tokens=False)) for p in prompts]
    for i, n in enumerate(prompt_tokens):
        if n > limit:
            raise ValueError(
                f"prompt {i} has {n} tokens; with the {image_tokens} image tokens of {bucket_h}x{bucket_w} and "
                f"{template_tokens} template tokens its sequence is {n + image_tokens + template_tokens} tokens, "
                f"more than the model's max_position_embeddings ({config.max_position_embeddings}); shorten it to "
                f"at most {max(limit, 0)} tokens or ask for a smaller image"
            )
    if negatives is not None and do_cfg:
        for n, text in zip(prompt_tokens, negatives):
            negative_tokens = len(tokenizer.encode(text, add_special_tokens=False))
            if negative_tokens > n:
                raise ValueError(negative_prompt_too_long(negative_tokens, n))

    return TextToImageRequest(
        prompts=list(prompts), negative_prompts=list(negatives) if negatives is not None else None,
        num_images_per_prompt=num_images_per_prompt, height=bucket_h, width=bucket_w, requested_size=(height, width),
        sigmas=sigmas, guidance_scale=float(guidance_scale), do_classifier_free_guidance=do_cfg,
        flow_shift=float(shift), prompt_tokens=prompt_tokens, sections=sections,
    )


def warn_if_resized(request: TextToImageRequest) -> None:
    if request.requested_size != (request.height, request.width):
        logger.warning("%dx%d is not one of this model's sizes: making %dx%d, the bucket nearest in aspect ratio "
                       "(supported_sizes, or the CLI's --list-sizes, lists them)", *request.requested_size,
                       request.height, request.width)
