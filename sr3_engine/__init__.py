"""sr3_engine: SR3 image super-resolution (Saharia et al. 2021) as a fast inference engine.

docs/ARCHITECTURE.md describes the layers; this module re-exports the public API and loads
the fused op backends (`op_backends`), so `import sr3_engine` is all a user needs.
"""

from . import op_backends, ops  # noqa: F401  (op_backends registers the triton and cpp op backends)
from .config import NAMED_UNET_CONFIGS, ScheduleConfig, UNetConfig
from .diffusion import condition, diffusion_loss, from_diffused, q_sample, sample_noise_levels, to_diffused
from .io import ImageError, ImageWarning, load_image, save_png
from .runtime.engine import SR3Engine
from .runtime.model_dir import bundled_models
from .runtime.tiling import MemoryBudgetError, TileGrid
from .samplers import SAMPLERS, SamplerConfig, SamplingPlan, make_plan, sample
from .schedules import NoiseSchedule
from .unet import SR3UNet, set_op_backend

__version__ = "0.1.0"

__all__ = [
    "ImageError",
    "MemoryBudgetError",
    "ImageWarning",
    "NAMED_UNET_CONFIGS",
    "NoiseSchedule",
    "SAMPLERS",
    "SR3Engine",
    "SR3UNet",
    "SamplerConfig",
    "SamplingPlan",
    "ScheduleConfig",
    "TileGrid",
    "UNetConfig",
    "bundled_models",
    "condition",
    "diffusion_loss",
    "from_diffused",
    "load_image",
    "make_plan",
    "ops",
    "q_sample",
    "sample",
    "sample_noise_levels",
    "save_png",
    "set_op_backend",
    "to_diffused",
]
