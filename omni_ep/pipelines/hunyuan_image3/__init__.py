__all__ = ["HunyuanImage3Pipeline", "HunyuanImage3PipelineOutput"]


def __getattr__(name: str):  # loaded on first use (diffusers); see omni_ep/pipelines/__init__.py
    if name in __all__:
        from omni_ep.pipelines.hunyuan_image3 import pipeline_hunyuan_image3

        return getattr(pipeline_hunyuan_image3, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
