"""Pipelines: prompt -> image, in diffusers' shape.

The pipeline classes import diffusers (seconds), so they load on first use: ``omni_ep.pipelines.hunyuan_image3.inputs``
(the checks of a call) stays light.
"""

__all__ = ["HunyuanImage3Pipeline", "HunyuanImage3PipelineOutput"]


def __getattr__(name: str):
    if name in __all__:
        from omni_ep.pipelines.hunyuan_image3 import pipeline_hunyuan_image3

        return getattr(pipeline_hunyuan_image3, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
