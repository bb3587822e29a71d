"""The checks and defaults of one text-to-image call, needing no weight (config.json, the tokenizer, the layout).

Kept apart from the pipeline (and from diffusers, whose import alone takes seconds), so a launcher checks a
request before it loads anything: ``check_inputs`` gives the same answer on every rank, and raises a ValueError
that says what to change.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

import numpy as np
import torch

from omni_ep.config import ParallelConfig
from omni_ep.models.hunyuan_image3.configuration import HunyuanImage3Config
from omni_ep.models.hunyuan_image3.tokenization import negative_prompt_too_long, snap_to_bucket

logger = logging.getLogger(__name__)

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
CALLBACK_TENSOR_INPUTS = ("latents", "noise_pred")  # what callback_on_step_end may ask for
TEMPLATE_TOKENS = 6  # <bos>, <boi>, <img_size>, <img_ratio>, <timestep>, <eoi> around the prompt and the image
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_dtype(device: torch.device | str) -> torch.dtype:
    """The weights' dtype when none is given: fp32 on a CPU (bf16 matmuls are slow there), bf16 elsewhere."""
    return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16


def vae_dtype_for(device: torch.device | str, dtype: torch.dtype) -> torch.dtype:
    """The VAE decoder's dtype: fp32 on a CPU (a bf16 decode there takes minutes instead of seconds), else dtype."""
    return torch.float32 if torch.device(device).type == "cpu" else dtype


def read_generation_config(path: str | os.PathLike) -> dict:
    """``generation_config.json`` of a checkpoint folder ({} when there is none)."""
    file = os.path.join(path, "generation_config.json")
    if not os.path.isfile(file):
        return {}
    with open(file) as f:
        return json.load(f)


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
    flow_shift: float
    prompt_tokens: list[int]  # token count of each prompt

    @property
    def num_inference_steps(self) -> int:
        return len(self.sigmas)

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self.guidance_scale > 1.0

    @property
    def num_images(self) -> int:
        return len(self.prompts) * self.num_images_per_prompt


def check_inputs(
    config: HunyuanImage3Config,
    tokenizer,
    parallel_config: ParallelConfig,
    generation_config: dict,
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
) -> TextToImageRequest:
    """Check a call and fill in its defaults; raise a ValueError saying what to change.

    Needs no weight (config.json, the tokenizer, the layout), and gives the same answer on every rank, so it runs
    before loading (in a launcher) and before any collective (in ``__call__``).
    """
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
    _, bucket_h, bucket_w = snap_to_bucket(height, width, base)

    if sigmas is not None:
        sigmas = [float(s) for s in sigmas]
        if not sigmas or any(not 0 < s <= 1 for s in sigmas) or any(a <= b for a, b in zip(sigmas, sigmas[1:])):
            raise ValueError(f"sigmas must be a non-empty, strictly decreasing list in (0, 1], got {sigmas}")
        if num_inference_steps is not None and num_inference_steps != len(sigmas):
            raise ValueError(f"num_inference_steps={num_inference_steps} but {len(sigmas)} sigmas; give one of them")
        num_inference_steps = len(sigmas)
    if num_inference_steps is None:
        num_inference_steps = int(generation_config.get("diff_infer_steps", 50))
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
    if sigmas is None:
        sigmas = np.linspace(1.0, 0.0, num_inference_steps + 1)[:-1].tolist()

    if guidance_scale is None:
        guidance_scale = float(generation_config.get("diff_guidance_scale", 5.0))
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
    limit = config.max_position_embeddings - image_tokens - TEMPLATE_TOKENS
    prompt_tokens = [len(tokenizer.encode(p, add_special_tokens=False)) for p in prompts]
    for i, n in enumerate(prompt_tokens):
        if n > limit:
            raise ValueError(
                f"prompt {i} has {n} tokens; with the {image_tokens} image tokens of {bucket_h}x{bucket_w} and "
                f"{TEMPLATE_TOKENS} template tokens its sequence is {n + image_tokens + TEMPLATE_TOKENS} tokens, "
                f"more than the model's max_position_embeddings ({config.max_position_embeddings}); shorten it to "
                f"at most {max(limit, 0)} tokens or ask for a smaller image"
            )
    if negatives is not None and guidance_scale > 1.0:
        for n, text in zip(prompt_tokens, negatives):
            negative_tokens = len(tokenizer.encode(text, add_special_tokens=False))
            if negative_tokens > n:
                raise ValueError(negative_prompt_too_long(negative_tokens, n))

    shift = flow_shift if flow_shift is not None else float(generation_config.get("flow_shift", 3.0))
    return TextToImageRequest(
        prompts=list(prompts), negative_prompts=list(negatives) if negatives is not None else None,
        num_images_per_prompt=num_images_per_prompt, height=bucket_h, width=bucket_w, requested_size=(height, width),
        sigmas=sigmas, guidance_scale=float(guidance_scale), flow_shift=shift, prompt_tokens=prompt_tokens,
    )


def warn_if_resized(request: TextToImageRequest) -> None:
    if request.requested_size != (request.height, request.width):
        logger.warning("%dx%d is not one of this model's sizes: making %dx%d, the bucket nearest in aspect ratio "
                       "(supported_sizes, or the CLI's --list-sizes, lists them)", *request.requested_size,
                       request.height, request.width)
