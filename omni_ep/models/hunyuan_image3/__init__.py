"""HunyuanImage-3.0 (text-to-image) with expert parallelism: config, transformer, loading, tiny checkpoints."""

from omni_ep.models.hunyuan_image3.attention import HunyuanImage3KVCache
from omni_ep.models.hunyuan_image3.configuration import HunyuanImage3Config, HunyuanImage3VAEConfig
from omni_ep.models.hunyuan_image3.loading import CheckpointError, load_transformer, load_vae_decoder
from omni_ep.models.hunyuan_image3.transformer import HunyuanImage3Transformer2DModel

__all__ = [
    "CheckpointError",
    "HunyuanImage3Config",
    "HunyuanImage3KVCache",
    "HunyuanImage3Transformer2DModel",
    "HunyuanImage3VAEConfig",
    "load_transformer",
    "load_vae_decoder",
]
