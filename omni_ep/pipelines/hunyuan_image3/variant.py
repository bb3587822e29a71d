"""Which HunyuanImage-3.0 checkpoint a folder holds, and what that changes for text-to-image.

    base             no Instruct flags, template "pretrain": CFG batch [cond; uncond], 50 steps, g 5.0
    instruct         template "instruct" (chat roles, <answer>, optional system prompt and CoT), 37 buckets,
                     CFG as the base (50 steps)
    instruct-distil  config ``cfg_distilled`` + ``use_meanflow``: one row per prompt (no uncond pass),
                     G = bf16(1000 g) into <guidance>, r = the next timestep into <timestep_r>, 8 steps

Everything here comes from config.json and generation_config.json (no weights), so a layout that cannot help
(CFG parallel on a distilled checkpoint) is refused on every rank before any weight is read. Defaults for steps,
guidance and shift come from generation_config.json (``diff_infer_steps``, ``diff_guidance_scale``,
``flow_shift``); a caller's argument overrides them.

System prompts (template "instruct"): the caller's text, or a preset named by the caller or by
generation_config's ``use_system_prompt`` ("None", "custom", "dynamic", "en_vanilla", "en_recaption",
"en_think_recaption", "en_unified", "likeness"). Preset texts are not bundled: they are read from the
checkpoint's own ``system_prompt.py`` (shipped with its remote code), as string constants parsed with ``ast``,
never executed.
"""

from __future__ import annotations

import ast
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from omni_ep.config import ParallelConfig
from omni_ep.models.hunyuan_image3.configuration import HunyuanImage3Config
from omni_ep.models.hunyuan_image3.tokenization import HunyuanImage3Template
from omni_ep.pipelines.hunyuan_image3.scheduling import distilled_guidance, meanflow_timesteps_r

logger = logging.getLogger(__name__)

VARIANTS = ("base", "instruct", "instruct-distil")
# preset name -> the string constant that holds it in the official system_prompt.py
SYSTEM_PROMPT_PRESETS = {
    "en_vanilla": "t2i_system_prompt_en_vanilla",
    "en_recaption": "t2i_system_prompt_en_recaption",
    "en_think_recaption": "t2i_system_prompt_en_think_recaption",
    "en_unified": "unified_system_prompt_en",
    "likeness": "likeness_system_prompt_en",
}
NO_SYSTEM_PROMPT = ("None", "")


def read_system_prompt_presets(path: str | os.PathLike) -> dict[str, str]:
    """Preset name -> text from ``<path>/system_prompt.py`` (module-level string constants; the file is parsed,
    not run); {} when the folder has no such file."""
    file = os.path.join(os.fspath(path), "system_prompt.py")
    if not os.path.isfile(file):
        return {}
    with open(file, encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=file)
    constants = {
        node.targets[0].id: node.value.value
        for node in tree.body
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
        and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
    }
    return {name: constants[var] for name, var in SYSTEM_PROMPT_PRESETS.items() if var in constants}


def read_generation_config(path: str | os.PathLike) -> dict:
    """``<path>/generation_config.json`` as a dict ({} when absent)."""
    file = os.path.join(os.fspath(path), "generation_config.json")
    if not os.path.isfile(file):
        return {}
    with open(file) as f:
        return json.load(f)


@dataclass(frozen=True)
class HunyuanImage3Variant:
    """What a checkpoint's text-to-image run looks like: its sequence template, its conditioning (CFG batch, or
    distilled guidance and MeanFlow r) and its generation defaults."""

    name: str  # one of VARIANTS
    template: HunyuanImage3Template
    cfg_distilled: bool = False
    use_meanflow: bool = False
    num_inference_steps: int = 50
    guidance_scale: float = 5.0
    flow_shift: float = 3.0
    use_system_prompt: str = "None"
    drop_think: bool = False
    system_prompt_presets: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_configs(
        cls, config: HunyuanImage3Config, generation_config: Mapping | None = None,
        system_prompt_presets: Mapping[str, str] | None = None,
    ) -> HunyuanImage3Variant:
        gen = dict(generation_config or {})
        distilled = bool(config.cfg_distilled or config.use_meanflow)
        instruct_config = distilled or config.model_version is not None
        template = HunyuanImage3Template(gen.get("sequence_template", "instruct" if instruct_config else "pretrain"),
                                         config.meta_slots)
        name = "instruct-distil" if distilled else "instruct" if template.name == "instruct" else "base"
        return cls(
            name=name,
            template=template,
            cfg_distilled=bool(config.cfg_distilled),
            use_meanflow=bool(config.use_meanflow),
            num_inference_steps=int(gen.get("diff_infer_steps", 8 if distilled else 50)),
            guidance_scale=float(gen.get("diff_guidance_scale", 5.0 if name == "base" else 2.5)),
            flow_shift=float(gen.get("flow_shift", 3.0)),
            use_system_prompt=str(gen.get("use_system_prompt", "None")),
            drop_think=bool(gen.get("drop_think", False)),
            system_prompt_presets=dict(system_prompt_presets or {}),
        )

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> HunyuanImage3Variant:
        """From a checkpoint folder's config.json, generation_config.json and system_prompt.py (no weights)."""
        return cls.from_configs(HunyuanImage3Config.from_pretrained(path), read_generation_config(path),
                                read_system_prompt_presets(path))

    # ---- what the caller left out -------------------------------------------------------------------------
    def defaults(self, num_inference_steps: int | None, guidance_scale: float | None,
                 flow_shift: float | None) -> tuple[int, float, float]:
        """(steps, guidance scale, shift): the arguments, each None replaced by this checkpoint's default."""
        return (self.num_inference_steps if num_inference_steps is None else num_inference_steps,
                self.guidance_scale if guidance_scale is None else guidance_scale,
                self.flow_shift if flow_shift is None else flow_shift)

    def does_cfg(self, guidance_scale: float) -> bool:
        """Whether a step runs the [cond; uncond] batch: never for a cfg-distilled checkpoint."""
        return not self.cfg_distilled and guidance_scale > 1.0

    def check_parallel_config(self, parallel_config: ParallelConfig) -> None:
        """Raise when the layout splits what this checkpoint does not have (identical on every rank)."""
        if self.cfg_distilled and parallel_config.cfg_parallel_size > 1:
            raise ValueError(
                f"this checkpoint ({self.name}) has guidance distilled into its weights: it runs one row per prompt "
                f"and no uncond pass, so CFG parallel (cfg_parallel_size={parallel_config.cfg_parallel_size}) has "
                "nothing to split. Use tensor parallel (TP), sequence parallel (SP: ulysses / ring) or data parallel "
                "(DP, several prompts), with expert parallel, instead"
            )

    # ---- per step -----------------------------------------------------------------------------------------
    def step_conditioning(self, timesteps: torch.Tensor, guidance_scale: float) -> dict[str, torch.Tensor]:
        """The transformer's extra inputs of every step, by keyword: {"guidance": [N], "timestep_r": [N]} as this
        checkpoint has them ({} for base and Instruct); on the device of timesteps [N]."""
        extra = {}
        if self.cfg_distilled:
            extra["guidance"] = distilled_guidance(guidance_scale).to(timesteps.device).expand(len(timesteps))
        if self.use_meanflow:
            extra["timestep_r"] = meanflow_timesteps_r(timesteps)
        return extra

    # ---- the text around the prompt -----------------------------------------------------------------------
    def text_sections(self, system_prompt: str | None = None, think: str | None = None,
                      recaption: str | None = None) -> dict[str, str | None]:
        """Keyword arguments of ``build_text_to_image_inputs``: the system prompt resolved (see the module
        docstring; None: generation_config's choice) and the caller's CoT texts. With generation_config's
        ``drop_think`` the think text is left out and a system prompt in use becomes "en_recaption", as the
        official image stage does."""
        if self.template.name != "instruct":
            if system_prompt or think or recaption:
                raise ValueError(f"this checkpoint ({self.name}) uses the pretrain template: no system prompt, "
                                 "think or recaption text goes into its sequence")
            return {}
        text = self._system_prompt(system_prompt, think, recaption)
        if self.drop_think and think:
            think = None
            text = text and self._system_prompt("en_recaption", think, recaption, required=False)
        return dict(system_prompt=text, think=think, recaption=recaption)

    def _system_prompt(self, choice: str | None, think: str | None, recaption: str | None,
                       required: bool | None = None) -> str | None:
        """The text of ``choice`` (None: generation_config's). A missing preset is an error when ``required``
        (default: when the caller chose it), else a warning and no system prompt."""
        required = choice is not None if required is None else required
        if choice is None:
            choice = self.use_system_prompt
            if choice == "custom":
                return None  # generation_config asks for the caller's text and there is none
        if choice in NO_SYSTEM_PROMPT:
            return None
        strip = False
        if choice == "dynamic":  # by the CoT that is present, as the official "dynamic" does by bot_task
            choice = "en_think_recaption" if think else "en_recaption" if recaption else "en_vanilla"
            strip = choice == "en_vanilla"
        if choice not in SYSTEM_PROMPT_PRESETS:
            return choice  # the caller's own text
        text = self.system_prompt_presets.get(choice)
        if text is None:
            message = (f"system prompt preset {choice!r} is not available: the checkpoint folder has no "
                       "system_prompt.py defining it; pass the text itself")
            if required:
                raise ValueError(message)
            logger.warning("%s; running without a system prompt", message)
        return text.strip("\n") if text is not None and strip else text
