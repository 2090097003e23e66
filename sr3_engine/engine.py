"""SR3Engine: low-res images in, super-resolved images out.

The public API works on images in [0, 1]; inside, images live in [-1, 1]. The low-res
input is upsampled bicubically by `scale` to form the condition x_up, then the reverse
process runs from pure noise with the engine's schedule and sampler.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from tqdm.auto import tqdm

from . import resize
from .backends import create_backend
from .config import SamplerConfig, ScheduleConfig, UNetConfig
from .diffusion import randn
from .io import atomic_path, pil_to_tensor, tensor_to_pil
from .samplers import StepCallback, initial_state, make_plan
from .schedules import NoiseSchedule
from .unet import SR3UNet

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_NAME = "sr3_engine"
FORMAT_VERSION = 1
ASSETS_DIR = Path(__file__).resolve().parent / "assets"
ENGINE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def default_schedule() -> NoiseSchedule:
    return NoiseSchedule.linear(100, 1e-4, 0.1)


def bundled_models() -> list[str]:
    if not ASSETS_DIR.is_dir():
        return []
    return sorted(p.name for p in ASSETS_DIR.iterdir() if (p / CONFIG_FILE).is_file())


def resolve_model_dir(name_or_path: str | Path) -> Path:
    """A model directory, or the name of a model bundled with the package."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if isinstance(name_or_path, str) and (ASSETS_DIR / name_or_path / CONFIG_FILE).is_file():
        return ASSETS_DIR / name_or_path
    raise FileNotFoundError(
        f"{name_or_path}: not a model directory and not a bundled model (bundled: {bundled_models() or 'none'})"
    )


class SR3Engine:
    """Serve an SR3 denoiser. `model` is any module with model(x_up, y_t, noise_level) -> eps.

    The engine takes the module over: it is moved to `device` and `dtype` and put in eval
    mode in place (copying a large model would double its memory); pass a copy to keep the
    original as it was.
    """

    def __init__(self, model: nn.Module, schedule: NoiseSchedule | None = None, scale: int = 4, *,
                 backend: str = "eager", device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, sampler: str | SamplerConfig = "ancestral",
                 progress: bool = True, op_backend: str = "auto", backend_options: dict[str, Any] | None = None):
        if not isinstance(scale, int) or scale < 1:
            raise ValueError(f"SR3Engine: scale must be a positive integer; got {scale!r}")
        if dtype not in ENGINE_DTYPES:
            raise ValueError(f"SR3Engine: dtype must be one of {ENGINE_DTYPES}; got {dtype}")
        self.schedule = schedule if schedule is not None else default_schedule()
        self.scale = scale
        self.sampler = sampler if isinstance(sampler, SamplerConfig) else SamplerConfig(name=sampler)
        self.device = torch.device(device)
        self.dtype = dtype
        self.progress = progress
        self.model = model
        self.backend = create_backend(backend, model, self.device, dtype, op_backend, backend_options)

    @property
    def size_multiple(self) -> int:
        config = getattr(self.model, "config", None)
        return config.size_multiple if isinstance(config, UNetConfig) else 1

    def _validate(self, lr: Any) -> torch.Tensor:
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
               callback: StepCallback | None = None) -> torch.Tensor:
        """(B, 3, h, w) in [0, 1] -> (B, 3, h*scale, w*scale) in [0, 1], float32, on lr's device.

        `steps` respaces the schedule to that many steps; `schedule` replaces it for this call.
        The same generator seed gives the same output.
        """
        lr = self._validate(lr)
        schedule = schedule if schedule is not None else self.schedule
        if steps is not None:
            schedule = schedule.respaced(steps)
        if sampler is None:
            sampler_config = self.sampler
        elif isinstance(sampler, SamplerConfig):
            sampler_config = sampler
        else:
            sampler_config = dataclasses.replace(self.sampler, name=sampler)
        plan = make_plan(schedule, sampler_config)

        x_up = resize.upsample(lr.to(self.device, torch.float32) * 2.0 - 1.0, self.scale).clamp(-1.0, 1.0)
        height, width = x_up.shape[-2:]
        multiple = self.size_multiple
        pad_h, pad_w = (-height) % multiple, (-width) % multiple
        if pad_h or pad_w:
            x_up = F.pad(x_up, (0, pad_w, 0, pad_h), mode="replicate")
        y_T = initial_state(plan, x_up, randn(tuple(x_up.shape), generator, self.device))

        with tqdm(total=plan.num_steps, desc="sampling", unit="step", disable=not self.progress,
                  leave=False) as bar:
            def on_step(i: int, total: int, y: torch.Tensor) -> None:
                bar.update(1)
                if callback is not None:
                    callback(i, total, y)

            y0 = self.backend.run(x_up, y_T, plan, generator=generator, callback=on_step)
        y0 = y0[..., :height, :width]
        return ((y0.float() + 1.0) / 2.0).clamp(0.0, 1.0).to(lr.device)

    def upscale(self, images: Sequence[Image.Image], *, generator: torch.Generator | None = None,
                steps: int | None = None, batch_size: int = 8) -> list[Image.Image]:
        """PIL images in, PIL images `scale` times larger out, in the same order. Images of one
        size are sampled together; an alpha channel is upscaled bicubically and re-attached."""
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
                hr = self.sample(lr, generator=generator, steps=steps)
                for i, out in zip(chunk, hr):
                    results[i] = self._with_alpha(images[i], tensor_to_pil(out))
        return results  # type: ignore[return-value]

    def _with_alpha(self, source: Image.Image, rgb: Image.Image) -> Image.Image:
        if "A" not in source.getbands() and "transparency" not in source.info:
            return rgb
        alpha = source.convert("RGBA").getchannel("A").resize(rgb.size, Image.Resampling.BICUBIC)
        out = rgb.convert("RGBA")
        out.putalpha(alpha)
        return out

    def save_pretrained(self, directory: str | Path, *, weights_dtype: torch.dtype | None = None) -> Path:
        """Write config.json (model, schedule, sampler, scale) and model.safetensors, each
        atomically. `weights_dtype` stores the weights in another precision (e.g. float16)."""
        config = getattr(self.model, "config", None)
        if not isinstance(config, UNetConfig):
            raise TypeError("SR3Engine.save_pretrained: only SR3UNet models (with a UNetConfig) can be saved")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to("cpu", weights_dtype or v.dtype).contiguous()
                 for k, v in self.model.state_dict().items()}
        with atomic_path(directory / WEIGHTS_FILE) as tmp:
            # Bytes written into atomic_path's file keep the user's umask; save_file's own files are 0600.
            tmp.write_bytes(save(state, metadata={"format": FORMAT_NAME}))
        document = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "model": config.to_dict(),
            "schedule": self.schedule.config.to_dict(),
            "sampler": self.sampler.to_dict(),
            "scale": self.scale,
        }
        with atomic_path(directory / CONFIG_FILE) as tmp:
            tmp.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
        return directory

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, *, backend: str = "eager",
                        device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                        **engine_kwargs: Any) -> "SR3Engine":
        """Load a directory written by save_pretrained (or a bundled model's name)."""
        directory = resolve_model_dir(name_or_path)
        config_path = directory / CONFIG_FILE
        document = read_config(config_path)
        try:
            model = SR3UNet(UNetConfig.from_dict(document["model"]))
            schedule = NoiseSchedule.from_config(ScheduleConfig.from_dict(document["schedule"]))
            sampler = SamplerConfig.from_dict(document.get("sampler", {}))
        except (TypeError, ValueError) as error:
            raise ValueError(f"{config_path}: {_one_line(error)}") from None
        weights_path = directory / WEIGHTS_FILE
        try:
            model.load_state_dict(read_weights(weights_path))
        except RuntimeError as error:
            raise ValueError(f"{weights_path}: does not match {CONFIG_FILE} ({_one_line(error)})") from None
        engine_kwargs.setdefault("sampler", sampler)
        return cls(model, schedule, int(document["scale"]), backend=backend, device=device, dtype=dtype,
                   **engine_kwargs)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; a model directory holds {CONFIG_FILE} and {WEIGHTS_FILE}")
    try:
        document = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT_NAME:
        raise ValueError(f"{path}: not an sr3_engine model config (no \"format\": \"{FORMAT_NAME}\")")
    if document.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{path}: written by a newer sr3_engine (format {document['format_version']})")
    for key in ("model", "schedule", "scale"):
        if key not in document:
            raise ValueError(f"{path}: missing the {key!r} entry")
    return document


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; a model directory holds {CONFIG_FILE} and {WEIGHTS_FILE}")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path}: not a readable safetensors file ({error})") from None
