"""Text-to-image with HunyuanImage-3.0, in diffusers' shape, on any TP x SP x CFG x DP (+ EP) layout.

    pipe = HunyuanImage3Pipeline.from_pretrained(path, parallel_config=ParallelConfig(...))
    images = pipe("a cat", height=1024, width=1024, seed=1234).images   # rank 0; None on the other ranks

Defaults: weights in fp32 on a CPU and bf16 on an accelerator (``default_dtype``; the VAE decoder stays fp32 on a
CPU, where a bf16 decode is many times slower); steps, guidance and shift from the checkpoint's
generation_config.json (``diff_infer_steps``, ``diff_guidance_scale``, ``flow_shift``), else the variant's
(``variant.py``); the size is the model's ``image_base_size``.
A requested size is snapped to the resolution bucket nearest in aspect ratio (a warning names the size made;
``supported_sizes`` lists them). Everything that needs no weight is checked by ``check_inputs`` (a function of
config.json, the tokenizer, the layout and the variant, so a launcher can run it before loading).

Guidance: with guidance_scale > 1 each image runs the rows [cond; uncond] and v = v_uncond + g (v_cond - v_uncond)
in fp32; guidance_scale <= 1 turns it off (one row per image, logged). The uncond row is the cond row's template
with the prompt tokens (and an Instruct CoT text) replaced one-for-one by <cfg> tokens; a negative_prompt puts its
own tokens first in the prompt's place and fills up with <cfg> to the prompt's token length (the rows share
positions, mask and KV cache), in either template; a negative prompt longer than its prompt is an error.

Parallel layout of one call:
- DP: the prompts are split round-robin over DP ranks (prompt i, with its num_images_per_prompt images, on DP
  rank i % DP). Every DP rank runs the same number of generations (a rank with fewer prompts repeats its last one
  and drops the result), because the expert-parallel group spans DP ranks and every rank must enter every MoE
  collective.
- CFG: without CFG parallel a rank runs [cond; uncond]; with cfg_parallel_size=2 CFG rank 0 runs the cond rows and
  rank 1 the uncond rows, and the two velocities are all-gathered.
- TP ranks run the same rows (attention heads split); EP splits the experts over every rank of the stage.
- SP (ulysses x ring) ranks run the same rows, each a contiguous share of the tokens (see the model's
  sequence_parallel.py); the model gathers the shares before its final layer, so every SP rank gets the whole
  velocity and the same latents (SP rank 0 decodes).
Latents: image k (prompt k // n, n = num_images_per_prompt) is ``latents[k]``, or drawn on the CPU from
``generator[k]``, from one ``generator`` in image order, or from ``torch.Generator().manual_seed(seed + k)``, so
results do not depend on the layout. Rank 0 returns the images of every prompt in order; every other rank None.

The checkpoint's variant (base, Instruct, Instruct-Distil; ``variant.py``) sets the template (and its buckets),
the defaults of steps / guidance / shift (generation_config.json) and the conditioning: Instruct-Distil runs one
row per image (no CFG, so no CFG parallel and no negative prompt) and feeds the distilled guidance and MeanFlow r
each step, as inputs of the captured step.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.utils import BaseOutput

from omni_ep.config import ParallelConfig
from omni_ep.distributed import (
    get_cfg_group,
    get_dp_group,
    get_ep_group,
    get_parallel_state,
    get_sp_group,
    get_tp_group,
    get_world_group,
    init_parallel_state,
    is_parallel_state_initialized,
)
from omni_ep.distributed.sequence_shards import sequence_shard_len
from omni_ep.forward_context import set_forward_context
from omni_ep.layers.fused_moe import FusedMoE
from omni_ep.layers.fused_moe.fp8 import check_quantization
from omni_ep.models.hunyuan_image3 import HunyuanImage3KVCache, load_transformer, load_vae_decoder
from omni_ep.models.hunyuan_image3.moe import HunyuanImage3Router
from omni_ep.models.hunyuan_image3.saving import check_savable, save_checkpoint
from omni_ep.models.hunyuan_image3.tokenization import TextToImageInputs, build_text_to_image_inputs
from omni_ep.models.hunyuan_image3.vae import decode_latents
from omni_ep.pipelines.cuda_graph import CachedStepGraph
from omni_ep.pipelines.hunyuan_image3.inputs import (
    CALLBACK_TENSOR_INPUTS,
    DTYPES,
    TextToImageRequest,
    check_inputs,
    default_dtype,
    vae_dtype_for,
    warn_if_resized,
)
from omni_ep.pipelines.hunyuan_image3.scheduling import make_scheduler
from omni_ep.pipelines.hunyuan_image3.variant import HunyuanImage3Variant, read_generation_config

logger = logging.getLogger(__name__)


@dataclass
class HunyuanImage3PipelineOutput(BaseOutput):
    """images: list of PIL images, or np [N, H, W, 3] / pt [N, 3, H, W] in [0, 1], or latents [N, 32, h, w]."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor


def parse_size(size: int | str) -> int:
    """Bytes from 2**30, "500MB" (10**6) or "2GiB" (2**30)."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+)\s*(B|KB|MB|GB|KiB|MiB|GiB)\s*", str(size))
    if not match:
        raise ValueError(f"max_shard_size must be bytes or a size like '5GB' / '500MiB', got {size!r}")
    unit = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}[match[2]]
    return int(match[1]) * unit


class HunyuanImage3Pipeline(DiffusionPipeline):
    """Prompt -> tokens -> transformer (denoising loop, flow-matching Euler) -> VAE decoder -> image."""

    _callback_tensor_inputs = list(CALLBACK_TENSOR_INPUTS)

    def __init__(self, transformer, vae, tokenizer, generation_config: dict | None = None,
                 variant: HunyuanImage3Variant | None = None):
        """The scheduler is made per call (flow-matching Euler with explicit shifted sigmas). variant: default
        from the transformer's config and generation_config (without system-prompt presets)."""
        super().__init__()
        self.register_modules(transformer=transformer, vae=vae, tokenizer=tokenizer)
        self.generation_config = generation_config or {}
        self.variant = variant or HunyuanImage3Variant.from_configs(transformer.config, self.generation_config)
        if is_parallel_state_initialized():
            self.variant.check_parallel_config(get_parallel_state().config)
        self.checkpoint_dtype: torch.dtype | None = None  # what save_pretrained writes (the checkpoint's own)
        # On CUDA, True replays the cached steps as one captured graph (cuda_graph.py). Off by default: at full size
        # an eager step leaves the GPU almost no idle time to remove, and the capture costs about one step.
        self.cuda_graphs = False
        # (captured, why not) of the last generation's graph; the graph itself is freed when its generation
        # ends (a captured collective must not outlive it: its communicator could not be torn down).
        self.cuda_graph_status: tuple[bool, str | None] | None = None
        self._guidance_scale, self._num_timesteps, self._interrupt = None, None, False
        self._do_classifier_free_guidance = False

    # ---- construction ------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        parallel_config: ParallelConfig | None = None,
        torch_dtype: torch.dtype | None = None,
        load_format: str = "safetensors",
        vae_dtype: torch.dtype | None = None,
        quantization: str | None = None,
        **kwargs,
    ) -> HunyuanImage3Pipeline:
        """Load from a HunyuanImage-3.0 checkpoint folder (the released layout). Initialises the parallel state
        from ``parallel_config`` unless it already is; each rank loads only its share of the weights.
        torch_dtype: default ``default_dtype(device)``; vae_dtype: default ``vae_dtype_for(device, torch_dtype)``.
        quantization: None (exact), or "fp8": the routed experts in FP8, quantized as they load (about twice the
        experts' speed on Hopper and half their memory; not exact)."""
        if kwargs:
            raise TypeError(f"unexpected arguments {sorted(kwargs)}")
        check_quantization(quantization)
        path = os.fspath(pretrained_model_name_or_path)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"checkpoint folder {path!r} does not exist")
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"{path!r} has no config.json: not a HunyuanImage-3.0 checkpoint folder")
        # The variant from config.json alone: a layout it cannot use fails here, on every rank, before any load.
        variant = HunyuanImage3Variant.from_pretrained(path)
        variant.check_parallel_config(parallel_config or (get_parallel_state().config if is_parallel_state_initialized()
                                                          else ParallelConfig()))
        if not is_parallel_state_initialized():
            init_parallel_state(parallel_config or ParallelConfig())
        elif parallel_config is not None and parallel_config != get_parallel_state().config:
            raise ValueError("the parallel state is already initialised with another layout; destroy it first")
        device = get_parallel_state().device
        from transformers import PreTrainedTokenizerFast

        torch_dtype = torch_dtype or default_dtype(device)
        vae_dtype = vae_dtype or vae_dtype_for(device, torch_dtype)
        start = time.perf_counter()
        transformer = load_transformer(path, dtype=torch_dtype, device=device, load_format=load_format,
                                       quantization=quantization)
        vae = load_vae_decoder(path, dtype=vae_dtype, device=device, load_format=load_format)
        stats = transformer.load_stats
        logger.debug("loaded %s in %.1f s: read %.1f MB (%.1f MB of experts) for the transformer", path,
                     time.perf_counter() - start, stats.bytes_read / 1e6, stats.expert_bytes_read / 1e6)
        tokenizer = PreTrainedTokenizerFast.from_pretrained(path)  # tokenizer.json
        pipe = cls(transformer, vae, tokenizer, generation_config=read_generation_config(path), variant=variant)
        pipe.checkpoint_dtype = stats.stored_dtype or torch_dtype
        return pipe

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        safe_serialization: bool = True,
        variant: str | None = None,
        max_shard_size: int | str = "1GiB",
        push_to_hub: bool = False,
        torch_dtype: torch.dtype | None = None,
        **kwargs,
    ) -> None:
        """Write the released layout: config.json, generation_config.json, tokenizer files, safetensors shards of
        at most ``max_shard_size`` + index, in ``torch_dtype`` (default: the dtype the checkpoint was stored in, so
        a bf16 checkpoint loaded in fp32 is written back in bf16). Needs the whole model in one process."""
        if kwargs:
            raise TypeError(f"unexpected arguments {sorted(kwargs)}")
        if not safe_serialization:
            raise ValueError("HunyuanImage-3.0 checkpoints are safetensors shards; safe_serialization=False is not supported")
        if variant is not None:
            raise ValueError(f"variant={variant!r}: weight variants are not supported; save without one")
        if push_to_hub:
            raise NotImplementedError("push_to_hub is not supported: save_pretrained, then upload the folder")
        max_shard_bytes = parse_size(max_shard_size)
        if get_world_group().world_size != 1:
            raise ValueError("save_pretrained needs the whole model in one process; load it without parallelism")
        check_savable(self.transformer)  # before any file is written
        os.makedirs(save_directory, exist_ok=True)
        self.transformer.config.to_json_file(os.path.join(save_directory, "config.json"))
        with open(os.path.join(save_directory, "generation_config.json"), "w") as f:
            json.dump(self.generation_config, f, indent=2)
        self.tokenizer.save_pretrained(save_directory)
        dtype = torch_dtype or self.checkpoint_dtype or self.dtype
        save_checkpoint(self.transformer, self.vae, save_directory, max_shard_bytes, dtype=dtype)

    def to(self, *args, **kwargs) -> HunyuanImage3Pipeline:
        """``to(device)``, ``to(dtype)``, ``to(device, dtype)`` or by keyword; returns self.

        dtype: the transformer's weights (the router stays fp32); the VAE decoder follows ``vae_dtype_for`` (fp32
        on a CPU). device: each rank's share of the weights and its process groups live on the device the parallel
        state picked, so only that device is accepted (a no-op); load with from_pretrained on another machine to
        run elsewhere. Everything is checked before anything is cast.
        """
        device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
        kwargs.pop("silence_dtype_warnings", None)
        if kwargs:
            raise TypeError(f"unexpected arguments {sorted(kwargs)}")
        for arg in args:
            if isinstance(arg, torch.dtype):
                dtype = arg
            elif isinstance(arg, (str, torch.device)):
                device = arg
            else:
                raise TypeError(f"to() takes a device and/or a dtype, got {arg!r}")
        if device is not None:
            device = torch.device(device)
            if device.type != self.device.type or device.index not in (None, self.device.index):
                raise ValueError(
                    f"this pipeline's weights live on {self.device}, where the parallel state placed them; moving "
                    f"them to {device} is not supported: load with from_pretrained where {device} is the device"
                )
        if dtype is not None and dtype not in DTYPES.values():
            raise ValueError(f"dtype must be one of {', '.join(map(str, DTYPES.values()))}, got {dtype}")
        if dtype is not None and dtype != self.dtype:
            experts = [m for m in self.transformer.modules() if isinstance(m, FusedMoE)]
            kept = {id(p) for m in self.transformer.modules() if isinstance(m, HunyuanImage3Router)
                    for p in m.parameters()}  # the fp32 router
            kept |= {id(p) for m in experts for p in m.parameters()}  # their own rule (FP8 weights stay FP8)
            for param in self.transformer.parameters():
                if id(param) not in kept and param.is_floating_point():
                    param.data = param.data.to(dtype)
            for m in experts:
                m.set_params_dtype(dtype)
            vae_dtype = vae_dtype_for(self.device, dtype)
            self.vae.to(vae_dtype)
            logger.info("weights in %s, VAE decoder in %s", dtype, vae_dtype)
        return self

    @property
    def device(self) -> torch.device:
        return self.transformer.model.wte.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    @property
    def supported_sizes(self) -> list[tuple[int, int]]:
        """(height, width) of every resolution bucket this model makes, in bucket order (sorted by height / width;
        the Instruct templates append four)."""
        return list(self.variant.template.buckets(self.transformer.config.image_base_size))

    @property
    def guidance_scale(self) -> float | None:
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        """Whether the last call ran [cond; uncond] rows (never on a distilled checkpoint)."""
        return self._do_classifier_free_guidance

    @property
    def num_timesteps(self) -> int | None:
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        """Set ``pipe._interrupt = True`` from callback_on_step_end to stop the loop after this step (the latents
        reached so far are decoded). The callback runs on every rank and must decide the same on all of them."""
        return self._interrupt

    # ---- the call ------------------------------------------------------------------------------------------
    def check_inputs(self, prompt, **kwargs) -> TextToImageRequest:
        """``check_inputs`` of this module with this pipeline's config, tokenizer, layout and variant."""
        return check_inputs(self.transformer.config, self.tokenizer, get_parallel_state().config, self.variant,
                            prompt, **kwargs)

    def prepare_latents(self, request: TextToImageRequest, seed, generator, latents) -> torch.Tensor:
        """fp32 [images, C, h, w] on the CPU, image k of prompt k // n: ``latents`` as given, or drawn image by image
        in order (the same on every rank and layout)."""
        if latents is not None:
            return latents.detach().float().cpu()
        factor = self.transformer.config.vae_downsample_factor[0]
        shape = (1, self.transformer.config.latent_channels, request.height // factor, request.width // factor)
        drawn = []
        for k in range(request.num_images):
            if isinstance(generator, (list, tuple)):
                g = generator[k]
            else:
                g = generator if generator is not None else torch.Generator().manual_seed((seed or 0) + k)
            drawn.append(torch.randn(shape, generator=g, device=g.device, dtype=torch.float32).cpu())
        return torch.cat(drawn)

    def encode_prompt(self, request: TextToImageRequest, index: int) -> TextToImageInputs:
        """Token ids of prompt ``index`` in this checkpoint's template: input_ids [n or 2n, S], its n cond rows, then
        (classifier-free guidance) its n uncond rows."""
        config = self.transformer.config
        negatives = None if request.negative_prompts is None else [request.negative_prompts[index]]
        inputs = build_text_to_image_inputs(
            self.tokenizer, [request.prompts[index]], request.height, request.width,
            request.do_classifier_free_guidance, config.image_base_size, config.vae_downsample_factor[0],
            self.variant.template, negative_prompts=negatives, **request.sections)
        rows = inputs.input_ids.repeat_interleave(request.num_images_per_prompt, dim=0)
        return dataclasses.replace(inputs, input_ids=rows)

    @torch.no_grad()
    def __call__(
        self,
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
        return_dict: bool = True,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 - diffusers' signature
        flow_shift: float | None = None,
        system_prompt: str | None = None,
        recaption: str | None = None,
        think: str | None = None,
    ):
        """Generate ``num_images_per_prompt`` images per prompt. Returns HunyuanImage3PipelineOutput (or a tuple) on
        rank 0, None elsewhere.

        height, width: default the model's image_base_size; snapped to the nearest resolution bucket (warned).
        num_inference_steps, guidance_scale, flow_shift: default the checkpoint's generation_config.json (else the
        variant's: 50 steps, or 8 for Instruct-Distil; guidance 5.0, or 2.5 for Instruct; shift 3.0);
        guidance_scale <= 1 runs without classifier-free guidance (Instruct-Distil feeds it to the model instead).
        sigmas: N unshifted sigmas in (0, 1], decreasing, instead of linspace(1, 0, N+1)[:-1] (shifted by flow_shift).
        negative_prompt: the uncond rows' text (see the module docstring; an error on Instruct-Distil).
        seed / generator / latents: see the module docstring.
        callback_on_step_end(pipe, step, timestep, {name: tensor for callback_on_step_end_tensor_inputs}) may
        return {"latents": ...} to replace them; "noise_pred" is the guided velocity [n, C, h, w] fp32.
        system_prompt, recaption, think (Instruct templates): the system prompt's text or preset name (None: the
        checkpoint's choice, "" or "None": none); a recaption / think text written beforehand (omni_ep has no
        text-generation stage), placed where the official template puts the model's own.
        """
        # 1. check inputs and fill in the checkpoint's defaults (identical on every rank, so before any collective)
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        request = self.check_inputs(
            prompt, height=height, width=width, num_inference_steps=num_inference_steps, sigmas=sigmas,
            guidance_scale=guidance_scale, negative_prompt=negative_prompt, num_images_per_prompt=num_images_per_prompt,
            seed=seed, generator=generator, latents=latents, output_type=output_type,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs, flow_shift=flow_shift,
            system_prompt=system_prompt, think=think, recaption=recaption)
        self._guidance_scale, self._num_timesteps, self._interrupt = request.guidance_scale, len(request.sigmas), False
        self._do_classifier_free_guidance = request.do_classifier_free_guidance
        warn_if_resized(request)
        if not request.do_classifier_free_guidance and not self.variant.cfg_distilled:
            logger.info("guidance_scale %s <= 1: classifier-free guidance is off (one row per image)%s",
                        request.guidance_scale, "; negative_prompt is unused" if negative_prompt is not None else "")
        cfg_group, dp_group, tp_group, sp_group = get_cfg_group(), get_dp_group(), get_tp_group(), get_sp_group()

        # 2. this DP rank's prompts, padded to the same number of generations on every DP rank
        num_prompts, n = len(request.prompts), request.num_images_per_prompt
        mine = list(range(dp_group.rank, num_prompts, dp_group.world_size))
        rounds = -(-num_prompts // dp_group.world_size)
        schedule = [mine[min(r, len(mine) - 1)] if mine else 0 for r in range(rounds)]

        # 3. latents of every image (same draws on every rank)
        all_latents = self.prepare_latents(request, seed, generator, latents)

        # 4. denoise this rank's prompts (the n images of a prompt as one batch), decode
        results = []
        # Without DP every rank holds the same final latents: all of them decode, a band of the image each.
        decode_group = get_world_group() if dp_group.world_size == 1 else None
        for r, index in enumerate(schedule):
            keep = r < len(mine)
            inputs = self.encode_prompt(request, index)
            latents_i = self.denoise(inputs, all_latents[index * n : (index + 1) * n], request.sigmas,
                                     request.guidance_scale, request.flow_shift, callback_on_step_end,
                                     callback_on_step_end_tensor_inputs)
            # TP, CFG and SP ranks hold the same latents: one of them keeps the result
            holder = keep and tp_group.rank == 0 and cfg_group.rank == 0 and sp_group.rank == 0
            if decode_group is not None and output_type != "latent":
                image = self.decode(latents_i, output_type, decode_group)
                if holder:
                    results.append((index, image))
            elif holder:
                results.append((index, self.decode(latents_i, output_type)))

        # 5. gather every prompt's images on rank 0
        gathered = get_world_group().all_gather_object(results)
        self.maybe_free_model_hooks()
        if get_parallel_state().rank != 0:
            return None
        by_index = dict(item for part in gathered for item in part)
        images = [by_index[i] for i in range(num_prompts)]
        if output_type == "pil":
            images = [im for batch in images for im in self.numpy_to_pil(batch)]
        elif output_type == "np":
            images = np.concatenate(images)
        else:
            images = torch.cat(images)
        return HunyuanImage3PipelineOutput(images=images) if return_dict else (images,)

    def denoise(self, inputs, latents, sigmas, guidance_scale, shift, callback, callback_tensor_inputs=("latents",)):
        """One prompt's denoising loop, its n images as one batch. latents [n, C, h, w] fp32 -> [n, C, h, w] fp32;
        inputs.input_ids [n or 2n, S] (n cond rows, then n uncond rows with classifier-free guidance)."""
        cfg_group = get_cfg_group()
        do_cfg = inputs.guidance
        input_ids = inputs.input_ids.to(self.device)  # [n or 2n, S]: cond (, uncond)
        if cfg_group.world_size == 2:
            input_ids = input_ids.chunk(2)[cfg_group.rank]  # this rank's branch
        rows = input_ids.shape[0]
        branches = rows // latents.shape[0]  # 2 with guidance on one rank, else 1
        image_slice = slice(*inputs.image_slice)
        # Cached steps run the meta slots (<timestep> [<guidance>] [<timestep_r>]) and the image, per row; an SP
        # rank feeds its share of each pass (padding included).
        sp_size = get_sp_group().world_size
        first_bound, cached_bound = self.moe_token_bounds(
            rows * sequence_shard_len(input_ids.shape[1], sp_size),
            rows * sequence_shard_len(image_slice.stop - inputs.timestep_index, sp_size))
        scheduler, timesteps = make_scheduler(len(sigmas), shift, device=self.device, sigmas=sigmas)
        # Instruct-Distil: {"guidance": [N], "timestep_r": [N]}, inputs of the captured step (they change per step)
        conditioning = self.variant.step_conditioning(timesteps, guidance_scale)
        kv_cache = HunyuanImage3KVCache()

        def cached_step(latents_BChw, t_B, *conditioning_B):
            with set_forward_context(max_tokens_across_ep=cached_bound):
                return self.transformer(latents_BChw, t_B, image_slice, inputs.timestep_index, kv_cache=kv_cache,
                                        **dict(zip(conditioning, conditioning_B)))

        graphed = self.cuda_graphs and self.device.type == "cuda"
        step_fn = CachedStepGraph(cached_step, self.all_ranks_ok) if graphed else cached_step
        latents = latents.to(self.device)
        with self.progress_bar(total=len(timesteps)) as progress:
            for step, t in enumerate(timesteps):
                if self.interrupt:
                    break
                latents_in, t_in = latents.repeat(branches, 1, 1, 1).to(self.dtype), t.expand(rows).to(self.device)
                extra_in = [values[step].expand(rows) for values in conditioning.values()]
                if step == 0:
                    with set_forward_context(max_tokens_across_ep=first_bound):
                        v = self.transformer(latents_in, t_in, image_slice, inputs.timestep_index,
                                             input_ids=input_ids, kv_cache=kv_cache,
                                             **dict(zip(conditioning, extra_in)))
                else:
                    v = step_fn(latents_in, t_in, *extra_in)
                v = v.float()
                if do_cfg:
                    v = cfg_group.all_gather(v) if cfg_group.world_size == 2 else v
                    v_cond, v_uncond = v.chunk(2)
                    v = v_uncond + guidance_scale * (v_cond - v_uncond)
                latents = scheduler.step(v, t, latents, return_dict=False)[0]
                if callback is not None:
                    tensors = {"latents": latents, "noise_pred": v}
                    out = callback(self, step, t, {name: tensors[name] for name in callback_tensor_inputs}) or {}
                    latents = out.get("latents", latents)
                progress.update()
        self.cuda_graph_status = (step_fn.captured, step_fn.error) if graphed else None
        return latents

    def all_ranks_ok(self, ok: bool) -> bool:
        """True when ``ok`` on every rank (one small all-reduce over the world)."""
        failed = torch.tensor([0.0 if ok else 1.0], device=self.device)
        return get_world_group().all_reduce(failed).item() == 0

    @staticmethod
    def moe_token_bounds(first_tokens: int, cached_tokens: int) -> tuple[int, int]:
        """The most tokens any EP rank feeds an MoE layer on step 0 and on the cached steps: one exchange per
        generation (DP ranks may hold prompts of other lengths), so that no step asks inside a layer."""
        sizes = get_ep_group().all_gather_object((first_tokens, cached_tokens))
        return max(a for a, _ in sizes), max(b for _, b in sizes)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, output_type: str, group=None):
        """latents [n, C, h, w] fp32 -> np [n, H, W, 3] / pt [n, 3, H, W] in [0, 1] / the latents themselves.
        group: every rank of it calls with the same latents and decodes a band (vae.decode_latents)."""
        if output_type == "latent":
            return latents.cpu()
        image = decode_latents(self.vae, latents, self.transformer.config.vae.scaling_factor, group).cpu()
        return image if output_type == "pt" else image.permute(0, 2, 3, 1).numpy()
