"""omni_ep: expert-parallel inference for Mixture-of-Experts diffusion transformers (HunyuanImage-3.0)."""

from omni_ep.config import ParallelConfig

__version__ = "0.1.0"
__all__ = ["ParallelConfig", "__version__"]
