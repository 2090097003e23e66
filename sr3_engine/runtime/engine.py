"""SR3Engine: low-res images in, super-resolved images out, in bounded memory.

The public API works on images in [0, 1]; inside, images live in [-1, 1]. The low-res
input becomes the condition x_up (`diffusion.condition`), then the reverse process runs
with the engine's schedule and sampler through `samplers.sample_with`, the path the public
`sr3_engine.sample` takes too, with the engine backend running the plan.

Large images are sampled in tiles (runtime/tiling.py) when the denoiser's working memory
for the whole image would exceed the budget (`max_memory`), or when `tile` asks for it.

An engine is configured once, at construction, and never changes afterwards: its
attributes are read-only, and every per-call choice (steps, schedule, sampler) is an
argument of `sample` and `upscale`.

Its precision, `dtype="auto"` by default, is bf16 where both the device and the backend compute
bf16 natively and float32 elsewhere (`choose_dtype`); `engine.dtype_reason` says why.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn
from PIL import Image
from tqdm.auto import tqdm

from ..config import PREDICTIONS, UNetConfig
from ..diffusion import condition, model_prediction, model_residual_scale, output_image
from ..io import has_alpha, pil_to_tensor, tensor_to_pil, to_rgb_or_rgba
from ..resize import RESAMPLERS
from ..samplers import SamplerConfig, StepCallback, make_plan, sample_with
from ..schedules import NoiseSchedule
from . import model_dir
from .backends import computes_bf16, create_backend
from .tiling import TileGrid, default_budget, plan_tiles

ENGINE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The one spelling of precisions in commands and settings; AUTO is `choose_dtype`'s.
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
AUTO = "auto"
PRECISION_CHOICES = (*PRECISIONS, AUTO)
# CPU flags under which oneDNN runs bf16 convolutions and matrix products in hardware; without
# them PyTorch emulates bf16, 5-8x slower than float32 (bench/RESULTS.md).
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def _prediction_of(model: nn.Module, prediction: str | None) -> str:
    own = model_prediction(model) if isinstance(getattr(model, "config", None), UNetConfig) else None
    if prediction is not None and own is not None and prediction != own:
        raise ValueError(f"SR3Engine: prediction={prediction!r} but the model's config predicts {own!r}")
    chosen = prediction or own or "eps"
    if chosen not in PREDICTIONS:
        raise ValueError(f"SR3Engine: prediction must be one of {PREDICTIONS}; got {chosen!r}")
    return chosen


def auto_device() -> str:
    """What the device `auto` means: cuda when available, else cpu."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def engine_dtype(name: str) -> torch.dtype | str:
    """A precision as commands and settings spell it (`PRECISION_CHOICES`), as SR3Engine's dtype."""
    if name == AUTO:
        return AUTO
    if name not in PRECISIONS:
        raise ValueError(f"dtype must be one of {PRECISION_CHOICES}; got {name!r}")
    return PRECISIONS[name]


def precision_name(dtype: torch.dtype) -> str:
    """fp32, fp16 or bf16: how commands print an engine's dtype."""
    return next(name for name, value in PRECISIONS.items() if value == dtype)


@functools.cache
def cpu_flags() -> frozenset[str]:
    """This CPU's feature names: torch's cpuinfo where this torch has it (`torch.cpu.get_capabilities`),
    else the flags line of /proc/cpuinfo; the two spell CPU_BF16_FLAGS alike."""
    get_capabilities = getattr(torch.cpu, "get_capabilities", None)
    if get_capabilities is not None:
        return frozenset(name for name, value in get_capabilities().items() if value is True)
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    match = re.search(r"^flags\s*:(.*)$", text, flags=re.MULTILINE)
    return frozenset(match[1].split()) if match else frozenset()


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 natively: a CUDA device of compute capability 8.0 (Ampere)
    or later, or a CPU with AVX-512 BF16 or AMX. The one capability check behind `auto`."""
    if device.type == "cuda":
        # Without CUDA the backend's own error says so, not this check's.
        return torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= (8, 0)
    if device.type == "cpu":
        return not cpu_flags().isdisjoint(CPU_BF16_FLAGS)
    return False


_NATIVE = {"cpu": "this CPU computes bf16 natively (AVX-512 BF16 or AMX)",
           "cuda": "this GPU computes bf16 natively (sm_80 or later)"}
_EMULATED = {"cpu": "this CPU has neither AVX-512 BF16 nor AMX, so bf16 would be emulated",
             "cuda": "this GPU predates sm_80, where bf16 became native"}


def choose_dtype(dtype: torch.dtype | str, device: torch.device, backend: str) -> tuple[torch.dtype, str]:
    """(the engine's dtype, why): `dtype` itself when given, or for AUTO bf16 where the device
    computes bf16 natively (`native_bf16`) and the backend does too on that kind of device
    (`backends.computes_bf16`), else float32."""
    if dtype != AUTO:
        if dtype not in ENGINE_DTYPES:
            raise ValueError(f"SR3Engine: dtype must be {AUTO!r} or one of {ENGINE_DTYPES}; got {dtype!r}")
        return dtype, "as asked"
    if not native_bf16(device):
        reason = _EMULATED.get(device.type, f"bf16 on {device.type} is not known to be native")
        return torch.float32, f"auto: {reason}"
    if not computes_bf16(backend, device):
        return torch.float32, f"auto: the {backend} backend does not compute bf16 on {device.type}"
    return torch.bfloat16, f"auto: {_NATIVE[device.type]}"


def default_schedule() -> NoiseSchedule:
    return NoiseSchedule.linear(100, 1e-4, 0.1)


class SR3Engine:
    """Serve an SR3 denoiser. `model` is any module with model(x_up, y_t, noise_level) -> output,
    where the output estimates `prediction` (eps, y0 or v; an SR3UNet's own config says which,
    any other module is taken as eps unless `prediction` says otherwise). What is diffused, the
    image or the residual over the condition, is the model's config's `residual_scale`.

    What happens to `model` depends on the backend (see runtime/backends): `eager`, `compile`
    and `fused` take it over, moving it to `device` and `dtype` (and, for `fused`, to
    channels_last) and putting it in eval mode in place, since copying a large model would
    double its memory; pass a copy to keep the original as it was. `onnxruntime` and
    `tensorrt` export a copy and leave `model` as it is.
    """

    def __init__(self, model: nn.Module, schedule: NoiseSchedule | None = None, scale: int = 4, *,
                 backend: str = "eager", device: str | torch.device = "cpu",
                 dtype: torch.dtype | str = AUTO, sampler: str | SamplerConfig = "ancestral",
                 progress: bool = True, op_backend: str = "auto", backend_options: dict[str, Any] | None = None,
                 tile: int | None = None, tile_overlap: int | None = None, max_memory: int | None = None,
                 resampler: str = "bicubic", prediction: str | None = None):
        if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
            raise ValueError(f"SR3Engine: scale must be a positive integer; got {scale!r}")
        for name, value in (("tile", tile), ("tile_overlap", tile_overlap), ("max_memory", max_memory)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"SR3Engine: {name} must be a non-negative integer or None; got {value!r}")
        self._tile, self._tile_overlap, self._max_memory = tile, tile_overlap, max_memory
        if resampler not in RESAMPLERS:
            raise ValueError(f"SR3Engine: resampler must be one of {RESAMPLERS}; got {resampler!r}")
        self._resampler = resampler
        self._prediction = _prediction_of(model, prediction)
        self._residual_scale = model_residual_scale(model)
        self._schedule = schedule if schedule is not None else default_schedule()
        self._scale = scale
        self._sampler = sampler if isinstance(sampler, SamplerConfig) else SamplerConfig(name=sampler)
        self._device = torch.device(device)
        self._dtype, self._dtype_reason = choose_dtype(dtype, self._device, backend)
        self._progress = progress
        self._model = model
        self._backend = create_backend(backend, model, self._device, self._dtype, op_backend, backend_options)

    schedule = property(lambda self: self._schedule, doc="The default inference schedule.")
    scale = property(lambda self: self._scale, doc="The upscaling factor.")
    sampler = property(lambda self: self._sampler, doc="The default SamplerConfig.")
    device = property(lambda self: self._device)
    dtype = property(lambda self: self._dtype, doc="The model's precision (`dtype=\"auto\"` chooses it).")
    dtype_reason = property(lambda self: self._dtype_reason,
                            doc="Why the engine runs in its dtype: 'as asked', or auto's reason.")
    progress = property(lambda self: self._progress, doc="Whether sampling shows a progress bar.")
    model = property(lambda self: self._model, doc="The module the engine was given.")
    backend = property(lambda self: self._backend, doc="The engine backend that runs the plan.")
    tile = property(lambda self: self._tile, doc="Default tile side in output pixels; None: automatic.")
    tile_overlap = property(lambda self: self._tile_overlap, doc="Default tile overlap; None: automatic.")
    resampler = property(lambda self: self._resampler, doc="How the condition is upsampled (resize.RESAMPLERS).")
    prediction = property(lambda self: self._prediction, doc="What the model's output estimates: eps, y0 or v.")
    residual_scale = property(lambda self: self._residual_scale,
                              doc="What the model diffuses: None, the image (SR3); s, the residual s (y0 - x_up).")
    max_memory = property(lambda self: self._max_memory,
                          doc="Bytes of denoiser working memory allowed; None: a share of free memory.")

    @property
    def size_multiple(self) -> int:
        config = getattr(self._model, "config", None)
        return config.size_multiple if isinstance(config, UNetConfig) else 1

    def sampler_config(self, sampler: str | SamplerConfig | None = None, *,
                       strength: float | None = None) -> SamplerConfig:
        """The SamplerConfig a call with these overrides uses: a name replaces only the engine
        sampler's name, a SamplerConfig replaces it whole, `strength` replaces its strength."""
        if sampler is None:
            config = self._sampler
        elif isinstance(sampler, SamplerConfig):
            config = sampler
        else:
            config = dataclasses.replace(self._sampler, name=sampler)
        return config if strength is None else dataclasses.replace(config, strength=strength)

    def schedule_for(self, steps: int | None = None, schedule: NoiseSchedule | None = None) -> NoiseSchedule:
        """The schedule a call with these overrides uses."""
        schedule = schedule if schedule is not None else self._schedule
        return schedule.respaced(steps) if steps is not None else schedule

    def tile_grid(self, batch: int, size: tuple[int, int], *, tile: int | None = None,
                  tile_overlap: int | None = None) -> TileGrid | None:
        """How a (batch, 3, *size) condition (output pixels, padded to the size multiple) is
        tiled, or None when it runs whole; `tile` and `tile_overlap` override the engine's."""
        config = getattr(self._model, "config", None)
        budget = self._max_memory if self._max_memory is not None else default_budget(self._device)
        most_tiles, largest_side = self._backend.tile_limits
        return plan_tiles(config if isinstance(config, UNetConfig) else None, batch, size, self._dtype.itemsize,
                          budget, tile=tile if tile is not None else self._tile,
                          overlap=tile_overlap if tile_overlap is not None else self._tile_overlap,
                          multiple=self.size_multiple, max_tiles_per_call=most_tiles, max_side=largest_side)

    def condition(self, lr: torch.Tensor) -> torch.Tensor:
        """The condition x_up of a checked (B, 3, h, w) batch in [0, 1], on the engine's device:
        float32 in [-1, 1], padded to the U-Net's size multiple (`diffusion.condition`)."""
        return condition(lr.to(self._device, torch.float32), self._scale, self.size_multiple, self._resampler)

    def check_input(self, lr: Any) -> torch.Tensor:
        """`lr` if it is a (B, 3, h, w) floating point batch in [0, 1], else ValueError in one line."""
        if not isinstance(lr, torch.Tensor):
            raise ValueError(f"SR3Engine.sample: expected a torch.Tensor of shape (B, 3, h, w); got {type(lr).__name__}")
        if lr.dim() != 4:
            raise ValueError(f"SR3Engine.sample: expected shape (B, 3, h, w); got {tuple(lr.shape)} ({lr.dim()}-D)")
        if lr.shape[0] == 0:
            raise ValueError("SR3Engine.sample: the batch is empty; expected at least one image")
        if lr.shape[1] != 3:
            raise ValueError(f"SR3Engine.sample: expected 3 (RGB) channels; got {lr.shape[1]} in shape {tuple(lr.shape)}")
        if lr.shape[2] == 0 or lr.shape[3] == 0:
            raise ValueError(f"SR3Engine.sample: images must be at least 1x1; got {tuple(lr.shape[2:])}")
        if not lr.is_floating_point():
            raise ValueError(f"SR3Engine.sample: expected a floating point tensor in [0, 1]; got {lr.dtype}"
                             " (for 8-bit images use x.float() / 255)")
        if not bool(torch.isfinite(lr).all()):
            raise ValueError("SR3Engine.sample: the input contains NaN or Inf")
        low, high = float(lr.min()), float(lr.max())
        if low < 0.0 or high > 1.0:
            raise ValueError(f"SR3Engine.sample: expected values in [0, 1]; got [{low:.4g}, {high:.4g}]")
        return lr

    def sample(self, lr: torch.Tensor, *, generator: torch.Generator | None = None, steps: int | None = None,
               schedule: NoiseSchedule | None = None, sampler: str | SamplerConfig | None = None,
               callback: StepCallback | None = None, tile: int | None = None,
               tile_overlap: int | None = None) -> torch.Tensor:
        """(B, 3, h, w) in [0, 1] -> (B, 3, h*scale, w*scale) in [0, 1], float32, on lr's device.

        `steps` respaces the schedule to that many steps; `schedule` replaces it for this call;
        `sampler` is a name or a SamplerConfig (see `sampler_config`); `tile` and `tile_overlap`
        (output pixels) override the engine's tiling. The same generator seed gives the same
        output. Raises MemoryBudgetError when even the smallest tile exceeds the budget.
        """
        lr = self.check_input(lr)
        schedule = self.schedule_for(steps, schedule)
        config = self.sampler_config(sampler)
        x_up = self.condition(lr)
        height, width = lr.shape[-2] * self._scale, lr.shape[-1] * self._scale
        grid = self.tile_grid(x_up.shape[0], tuple(x_up.shape[-2:]), tile=tile, tile_overlap=tile_overlap)

        steps_run = make_plan(schedule, config, self._prediction).num_steps
        with tqdm(total=steps_run, desc="sampling", unit="step", disable=not self._progress, leave=False) as bar:
            def on_step(i: int, total: int, y: torch.Tensor) -> None:
                bar.update(1)
                if callback is not None:
                    callback(i, total, y)

            run = functools.partial(self._backend.run, tiles=grid)
            y0 = sample_with(run, x_up, schedule, config, prediction=self._prediction,
                             residual_scale=self._residual_scale, generator=generator, callback=on_step)
        y0 = y0[..., :height, :width]
        return output_image(y0).to(lr.device)

    def upscale(self, images: Sequence[Image.Image], *, generator: torch.Generator | None = None,
                steps: int | None = None, schedule: NoiseSchedule | None = None,
                sampler: str | SamplerConfig | None = None, batch_size: int = 8, tile: int | None = None,
                tile_overlap: int | None = None) -> list[Image.Image]:
        """PIL images in, PIL images `scale` times larger out, in the same order. Images of one
        size are sampled together; an alpha channel is upscaled bicubically and re-attached.
        The other arguments are those of `sample`."""
        if batch_size < 1:
            raise ValueError(f"SR3Engine.upscale: batch_size must be positive; got {batch_size}")
        results: list[Image.Image | None] = [None] * len(images)
        by_size: dict[tuple[int, int], list[int]] = {}
        for index, image in enumerate(images):
            by_size.setdefault(image.size, []).append(index)
        for indices in by_size.values():
            for start in range(0, len(indices), batch_size):
                chunk = indices[start:start + batch_size]
                lr = torch.stack([pil_to_tensor(images[i]) for i in chunk])
                hr = self.sample(lr, generator=generator, steps=steps, schedule=schedule, sampler=sampler, tile=tile,
                                 tile_overlap=tile_overlap)
                for i, out in zip(chunk, hr):
                    results[i] = with_alpha(images[i], tensor_to_pil(out))
        return results  # type: ignore[return-value]

    def save_pretrained(self, directory: str | os.PathLike, *, weights_dtype: torch.dtype | None = None) -> Path:
        """Write config.json (model, schedule, sampler, scale) and model.safetensors (see
        `runtime.model_dir`). `weights_dtype` stores the weights in another precision."""
        config = getattr(self._model, "config", None)
        if not isinstance(config, UNetConfig):
            raise TypeError("SR3Engine.save_pretrained: only SR3UNet models (with a UNetConfig) can be saved")
        spec = model_dir.ModelSpec(config, self._schedule.config, self._sampler, self._scale, self._resampler)
        return model_dir.write(directory, self._model.state_dict(), spec, weights_dtype=weights_dtype)

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, *, backend: str = "eager",
                        device: str | torch.device = "cpu", dtype: torch.dtype | str = AUTO,
                        **engine_kwargs: Any) -> "SR3Engine":
        """Load a model directory (see `runtime.model_dir`) or a bundled model's name."""
        model, spec = model_dir.load(name_or_path)
        engine_kwargs.setdefault("sampler", spec.sampler)
        engine_kwargs.setdefault("resampler", spec.resampler)
        return cls(model, NoiseSchedule.from_config(spec.schedule), spec.scale, backend=backend, device=device,
                   dtype=dtype, **engine_kwargs)


def with_alpha(source: Image.Image, rgb: Image.Image) -> Image.Image:
    """`rgb`, the model's output for `source`, with source's alpha (if any) upscaled bicubically."""
    if not has_alpha(source):
        return rgb
    alpha = to_rgb_or_rgba(source).getchannel("A").resize(rgb.size, Image.Resampling.BICUBIC)
    out = rgb.convert("RGBA")
    out.putalpha(alpha)
    return out
