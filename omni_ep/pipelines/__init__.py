"""Pipelines: prompt -> image, in diffusers' shape."""

from omni_ep.pipelines.hunyuan_image3 import HunyuanImage3Pipeline, HunyuanImage3PipelineOutput

__all__ = ["HunyuanImage3Pipeline", "HunyuanImage3PipelineOutput"]
