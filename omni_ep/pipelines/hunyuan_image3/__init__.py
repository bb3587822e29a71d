from omni_ep.pipelines.hunyuan_image3.pipeline_hunyuan_image3 import HunyuanImage3Pipeline, HunyuanImage3PipelineOutput

__all__ = ["HunyuanImage3Pipeline", "HunyuanImage3PipelineOutput"]
