"""Text-to-image with HunyuanImage-3.0, in diffusers' shape, on any TP x SP x CFG x DP (+ EP) layout.

    pipe = HunyuanImage3Pipeline.from_pretrained(path, parallel_config=ParallelConfig(...), torch_dtype=torch.bfloat16)
    images = pipe("a cat", height=1024, width=1024, seed=1234).images   # rank 0; None on the other ranks

Parallel layout of one call:
- DP: the list of prompts is split round-robin over DP ranks (prompt i on DP rank i % DP). Every DP rank runs
  the same number of generations (a rank with fewer prompts repeats its last one and drops the result), because
  the expert-parallel group spans DP ranks and every rank must enter every MoE collective.
- CFG: without CFG parallel a rank runs the batch [cond; uncond]; with cfg_parallel_size=2 CFG rank 0 runs cond
  and rank 1 uncond, and the two velocities are all-gathered. v = v_uncond + g * (v_cond - v_uncond), fp32.
- TP ranks run the same rows (attention heads split); EP splits the experts over every rank of the stage.
- SP (ulysses x ring) ranks run the same rows, each a contiguous share of the tokens (see the model's
  sequence_parallel.py); the model gathers the shares before its final layer, so every SP rank gets the whole
  velocity and the same latents (SP rank 0 decodes).
Latents of prompt i come from ``torch.Generator().manual_seed(seed + i)`` on the CPU (or from ``generator``
drawn in prompt order), so results do not depend on the layout. Rank 0 returns the images of every prompt in
order; every other rank returns None.

The checkpoint's variant (base, Instruct, Instruct-Distil; ``variant.py``) sets the template, the defaults of
steps / guidance / shift (generation_config.json) and the conditioning: Instruct-Distil runs one row per prompt
(no CFG, so no CFG parallel) and feeds the distilled guidance and MeanFlow r each step.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Callable

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline
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
from omni_ep.models.hunyuan_image3 import (
    HunyuanImage3KVCache,
    load_transformer,
    load_vae_decoder,
)
from omni_ep.models.hunyuan_image3.saving import save_checkpoint
from omni_ep.models.hunyuan_image3.tokenization import TextToImageInputs, build_text_to_image_inputs
from omni_ep.models.hunyuan_image3.vae import decode_latents
from omni_ep.pipelines.cuda_graph import CachedStepGraph
from omni_ep.pipelines.hunyuan_image3.scheduling import make_scheduler
from omni_ep.pipelines.hunyuan_image3.variant import HunyuanImage3Variant, read_generation_config

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


@dataclass
class HunyuanImage3PipelineOutput(BaseOutput):
    """images: list of PIL images, or np [N, H, W, 3] / pt [N, 3, H, W] in [0, 1], or latents [N, 32, h, w]."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor


class HunyuanImage3Pipeline(DiffusionPipeline):
    """Prompt -> tokens -> transformer (denoising loop, flow-matching Euler) -> VAE decoder -> image."""

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
        self.cuda_graphs = True  # on CUDA, the cached steps replay one captured graph (see cuda_graph.py)
        # (captured, why not) of the last generation's graph; the graph itself is freed when its generation
        # ends (a captured collective must not outlive it: its communicator could not be torn down).
        self.cuda_graph_status: tuple[bool, str | None] | None = None

    # ---- construction ------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        parallel_config: ParallelConfig | None = None,
        torch_dtype: torch.dtype = torch.bfloat16,
        load_format: str = "safetensors",
        vae_dtype: torch.dtype | None = None,
        **kwargs,
    ) -> HunyuanImage3Pipeline:
        """Load from a HunyuanImage-3.0 checkpoint folder (the released layout). Initialises the parallel state
        from ``parallel_config`` unless it already is; each rank loads only its share of the weights.
        The VAE decoder runs in ``vae_dtype`` (default fp32 on CPU, else torch_dtype)."""
        if kwargs:
            raise TypeError(f"unexpected arguments {sorted(kwargs)}")
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

        transformer = load_transformer(path, dtype=torch_dtype, device=device, load_format=load_format)
        vae_dtype = vae_dtype or (torch.float32 if device.type == "cpu" else torch_dtype)
        if load_format == "dummy":
            from omni_ep.models.hunyuan_image3.vae import HunyuanVAEDecoder

            vae = HunyuanVAEDecoder.from_vae_config(transformer.config.vae.to_dict()).to(device, vae_dtype).eval()
        else:
            vae = load_vae_decoder(path, dtype=vae_dtype, device=device)
        tokenizer = PreTrainedTokenizerFast.from_pretrained(path)  # tokenizer.json
        return cls(transformer, vae, tokenizer, generation_config=read_generation_config(path), variant=variant)

    def save_pretrained(self, save_directory: str | os.PathLike, max_shard_bytes: int = 2**30, **kwargs) -> None:
        """Write the released layout: config.json, generation_config.json, tokenizer files, shards + index.
        Needs the whole model in one process (a single-process pipeline)."""
        if get_world_group().world_size != 1:
            raise ValueError("save_pretrained needs the whole model in one process; load it without parallelism")
        os.makedirs(save_directory, exist_ok=True)
        self.transformer.config.to_json_file(os.path.join(save_directory, "config.json"))
        with open(os.path.join(save_directory, "generation_config.json"), "w") as f:
            json.dump(self.generation_config, f, indent=2)
        self.tokenizer.save_pretrained(save_directory)
        save_checkpoint(self.transformer, self.vae, save_directory, max_shard_bytes)

    @property
    def device(self) -> torch.device:
        return self.transformer.model.wte.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    # ---- the call ------------------------------------------------------------------------------------------
    def check_inputs(self, prompts, height, width, num_inference_steps, guidance_scale, output_type):
        """Raise a ValueError saying what to change; identical on every rank, so before any collective."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise ValueError("prompt must be a string or a non-empty list of strings")
        if not all(isinstance(p, str) for p in prompts):
            raise ValueError("every prompt must be a string")
        factor = self.transformer.config.vae_downsample_factor[0]
        if height % factor or width % factor or height <= 0 or width <= 0:
            raise ValueError(f"height and width must be positive multiples of {factor}, got {height}x{width}")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
        if get_parallel_state().config.cfg_parallel_size == 2 and guidance_scale <= 1.0:
            raise ValueError(
                f"cfg_parallel_size=2 runs one guidance branch per rank and needs guidance_scale > 1 "
                f"(got {guidance_scale}); use cfg_parallel_size=1 without guidance"
            )
        return list(prompts)

    def prepare_latents(self, num_prompts, latent_shape, seed, generator) -> list[torch.Tensor]:
        """One fp32 [1, C, h, w] latent per prompt, drawn on the CPU in prompt order (layout-independent)."""
        latents = []
        for i in range(num_prompts):
            g = generator if generator is not None else torch.Generator().manual_seed((seed or 0) + i)
            latents.append(torch.randn((1, *latent_shape), generator=g, dtype=torch.float32))
        return latents

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        height: int = 1024,
        width: int = 1024,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        flow_shift: float | None = None,
        system_prompt: str | None = None,
        recaption: str | None = None,
        think: str | None = None,
    ):
        """Generate one image per prompt. Returns HunyuanImage3PipelineOutput (or a tuple) on rank 0, None elsewhere.

        num_inference_steps, guidance_scale, flow_shift: None takes the checkpoint's generation_config.json.
        callback_on_step_end(pipe, step, timestep, {"latents": latents}) may return {"latents": ...} to replace them.
        system_prompt, recaption, think (Instruct templates): the system prompt's text or preset name (None: the
        checkpoint's choice, "" or "None": none); a recaption / think text written beforehand (omni_ep has no
        text-generation stage), placed where the official template puts the model's own.
        """
        # 0. the checkpoint's defaults for what the caller left out; the text around the prompt
        num_inference_steps, guidance_scale, shift = self.variant.defaults(num_inference_steps, guidance_scale,
                                                                           flow_shift)
        sections = self.variant.text_sections(system_prompt, think, recaption)
        # 1. check inputs (before any collective)
        prompts = self.check_inputs(prompt, height, width, num_inference_steps, guidance_scale, output_type)
        config, state = self.transformer.config, get_parallel_state()
        cfg_group, dp_group, tp_group = get_cfg_group(), get_dp_group(), get_tp_group()
        do_cfg = self.variant.does_cfg(guidance_scale)

        # 2. this DP rank's prompts, padded to the same number of generations on every DP rank
        mine = list(range(dp_group.rank, len(prompts), dp_group.world_size))
        rounds = -(-len(prompts) // dp_group.world_size)
        schedule = [mine[min(r, len(mine) - 1)] if mine else 0 for r in range(rounds)]

        # 3. latents of every prompt (same draws on every rank)
        probe = self.encode_prompt(prompts[:1], height, width, do_cfg, sections)
        latent_shape = (config.latent_channels, probe.latent_height, probe.latent_width)
        all_latents = self.prepare_latents(len(prompts), latent_shape, seed, generator)

        results = []
        # Without DP every rank holds the same final latents: all of them decode, a band of the image each.
        decode_group = get_world_group() if dp_group.world_size == 1 else None
        for r, index in enumerate(schedule):
            keep = r < len(mine)
            latents = self.denoise(prompts[index], all_latents[index], height, width, num_inference_steps,
                                   guidance_scale, shift, callback_on_step_end, sections)
            if decode_group is not None and output_type != "latent":
                image = self.decode(latents, output_type, decode_group)
                if keep and tp_group.rank == 0 and cfg_group.rank == 0 and get_sp_group().rank == 0:
                    results.append((index, image))
            elif keep and tp_group.rank == 0 and cfg_group.rank == 0 and get_sp_group().rank == 0:
                results.append((index, self.decode(latents, output_type)))

        # 4. gather every prompt's result on rank 0
        gathered = get_world_group().all_gather_object(results)
        self.maybe_free_model_hooks()
        if state.rank != 0:
            return None
        by_index = dict(item for part in gathered for item in part)
        images = [by_index[i] for i in range(len(prompts))]
        if output_type == "pil":
            images = [im for batch in images for im in self.numpy_to_pil(batch)]
        elif output_type == "np":
            images = np.concatenate(images)
        else:
            images = torch.cat(images)
        return HunyuanImage3PipelineOutput(images=images) if return_dict else (images,)

    def denoise(self, prompt, latents, height, width, num_inference_steps, guidance_scale, shift, callback,
                sections=None):
        """One prompt's denoising loop. latents [1, C, h, w] fp32 -> [1, C, h, w] fp32. sections: the text around
        the prompt (``variant.text_sections``)."""
        cfg_group = get_cfg_group()
        do_cfg = self.variant.does_cfg(guidance_scale)
        inputs = self.encode_prompt([prompt], height, width, do_cfg, sections)
        input_ids = inputs.input_ids.to(self.device)  # [1 or 2, S]: cond (, uncond)
        if cfg_group.world_size == 2:
            input_ids = input_ids[cfg_group.rank : cfg_group.rank + 1]  # this rank's branch
        rows = input_ids.shape[0]
        image_slice = slice(*inputs.image_slice)
        # Cached steps run the meta slots (<timestep> [<guidance>] [<timestep_r>]) and the image, per row; an SP
        # rank feeds its share of each pass (padding included).
        sp_size = get_sp_group().world_size
        first_bound, cached_bound = self.moe_token_bounds(
            rows * sequence_shard_len(input_ids.shape[1], sp_size),
            rows * sequence_shard_len(image_slice.stop - inputs.timestep_index, sp_size))
        scheduler, timesteps = make_scheduler(num_inference_steps, shift, device=self.device)
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
        with self.progress_bar(total=num_inference_steps) as progress:
            for step, t in enumerate(timesteps):
                latents_in, t_in = latents.expand(rows, -1, -1, -1).to(self.dtype), t.expand(rows).to(self.device)
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
                    out = callback(self, step, t, {"latents": latents}) or {}
                    latents = out.get("latents", latents)
                progress.update()
        self.cuda_graph_status = (step_fn.captured, step_fn.error) if graphed else None
        return latents

    def encode_prompt(self, prompts: list[str], height: int, width: int, do_cfg: bool,
                      sections: dict | None = None) -> TextToImageInputs:
        """Token layout of ``prompts`` in this checkpoint's template; sections: ``variant.text_sections``."""
        config = self.transformer.config
        return build_text_to_image_inputs(self.tokenizer, prompts, height, width, do_cfg, config.image_base_size,
                                          config.vae_downsample_factor[0], self.variant.template, **(sections or {}))

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
        """latents [1, C, h, w] fp32 -> np [1, H, W, 3] / pt [1, 3, H, W] in [0, 1] / the latents themselves.
        group: every rank of it calls with the same latents and decodes a band (vae.decode_latents)."""
        if output_type == "latent":
            return latents.cpu()
        image = decode_latents(self.vae, latents, self.transformer.config.vae.scaling_factor, group).cpu()
        return image if output_type == "pt" else image.permute(0, 2, 3, 1).numpy()
