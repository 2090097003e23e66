"""sr3_engine: SR3 image super-resolution (Saharia et al. 2021) as a fast inference engine."""

from .config import NAMED_UNET_CONFIGS, SamplerConfig, ScheduleConfig, UNetConfig
from .diffusion import diffusion_loss, q_sample, sample_noise_levels
from .engine import SR3Engine, bundled_models
from .io import ImageError, load_image, save_png
from .samplers import SAMPLERS, SamplingPlan, ancestral, ddim, make_plan
from .schedules import NoiseSchedule
from .unet import SR3UNet, set_op_backend

__version__ = "0.1.0"

__all__ = [
    "ImageError",
    "NAMED_UNET_CONFIGS",
    "NoiseSchedule",
    "SAMPLERS",
    "SR3Engine",
    "SR3UNet",
    "SamplerConfig",
    "SamplingPlan",
    "ScheduleConfig",
    "UNetConfig",
    "ancestral",
    "bundled_models",
    "ddim",
    "diffusion_loss",
    "load_image",
    "make_plan",
    "q_sample",
    "sample_noise_levels",
    "save_png",
    "set_op_backend",
]
