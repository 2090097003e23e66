"""The model directory format, owned here alone: `config.json` + `model.safetensors`.

    config.json        {"format": "sr3_engine", "format_version": 1, "model": UNetConfig,
                        "schedule": ScheduleConfig (the default inference schedule),
                        "sampler": SamplerConfig (the default sampler), "scale": int,
                        "resampler": the conditioning upsampler (resize.RESAMPLERS; absent:
                        "bicubic", what every earlier directory was trained with),
                        "train_schedule": ScheduleConfig the model was trained with (optional)}
    model.safetensors  the U-Net's state_dict (any float dtype; loaded into float32)

The engine (`from_pretrained`/`save_pretrained`), training checkpoints, export and the
commands read and write model directories through this module. Reading validates every
entry and turns any problem into one `ValueError` or `FileNotFoundError` line that names the
file and the field; nothing is unpickled. Each file is written to a temporary name and
renamed (`write`); `replace` swaps a whole directory in, so a reader never sees a mix of
two versions. Models bundled with the package live under `sr3_engine/assets/<name>/` and
can be named instead of a path.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from ..config import ScheduleConfig, UNetConfig
from ..io import atomic_path, one_line
from ..resize import RESAMPLERS
from ..samplers import SamplerConfig
from ..unet import SR3UNet

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_NAME = "sr3_engine"
FORMAT_VERSION = 1
ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
MAX_SCALE = 32


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Everything config.json says: the network, its default inference schedule and sampler, and
    the upscaling factor."""

    model: UNetConfig
    schedule: ScheduleConfig
    sampler: SamplerConfig
    scale: int
    resampler: str = "bicubic"
    train_schedule: ScheduleConfig | None = None

    def __post_init__(self) -> None:
        if isinstance(self.scale, bool) or not isinstance(self.scale, int) or not 1 <= self.scale <= MAX_SCALE:
            raise ValueError(f"scale must be an integer in [1, {MAX_SCALE}]; got {self.scale!r}")
        if self.resampler not in RESAMPLERS:
            raise ValueError(f"resampler must be one of {RESAMPLERS}; got {self.resampler!r}")

    def to_document(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "model": self.model.to_dict(),
            "schedule": self.schedule.to_dict(),
            "sampler": self.sampler.to_dict(),
            "scale": self.scale,
            "resampler": self.resampler,
            **({"train_schedule": self.train_schedule.to_dict()} if self.train_schedule is not None else {}),
        }


def bundled_models() -> list[str]:
    if not ASSETS_DIR.is_dir():
        return []
    return sorted(p.name for p in ASSETS_DIR.iterdir() if (p / CONFIG_FILE).is_file())


def resolve(name_or_path: str | os.PathLike) -> Path:
    """A model directory, or the name of a model bundled with the package."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if path.is_file() and path.suffix in (".pth", ".pt"):
        raise ValueError(f"{path}: a PyTorch checkpoint, not a model directory; convert it first: python -m "
                         f"sr3_engine convert {path} --config THEIR_CONFIG.json --out {path.with_suffix('')}")
    if isinstance(name_or_path, str) and (ASSETS_DIR / name_or_path / CONFIG_FILE).is_file():
        return ASSETS_DIR / name_or_path
    raise FileNotFoundError(
        f"{name_or_path}: not a model directory and not a bundled model (bundled: {bundled_models() or 'none'})"
    )


def read_spec(directory: Path) -> ModelSpec:
    """config.json of `directory`, validated."""
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; a model directory holds {CONFIG_FILE} and {WEIGHTS_FILE}")
    try:
        document = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT_NAME:
        raise ValueError(f"{path}: not an sr3_engine model config (no \"format\": \"{FORMAT_NAME}\")")
    version = document.get("format_version", 0)
    if isinstance(version, bool) or not isinstance(version, int):
        raise ValueError(f"{path}: format_version must be an integer; got {version!r}")
    if version > FORMAT_VERSION:
        raise ValueError(f"{path}: written by a newer sr3_engine (format {version})")
    for key in ("model", "schedule", "scale"):
        if key not in document:
            raise ValueError(f"{path}: missing the {key!r} entry")
    parts: dict[str, Any] = {}
    for key, kind in (("model", UNetConfig), ("schedule", ScheduleConfig), ("sampler", SamplerConfig),
                      ("train_schedule", ScheduleConfig)):
        if key == "train_schedule" and key not in document:
            continue
        entry = document.get(key, {})
        if not isinstance(entry, Mapping):
            raise ValueError(f"{path}: {key}: expected a JSON object; got {type(entry).__name__}")
        try:
            parts[key] = kind.from_dict(entry)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{path}: {key}: {one_line(error)}") from None
    try:
        return ModelSpec(scale=document["scale"], resampler=document.get("resampler", "bicubic"), **parts)
    except ValueError as error:
        raise ValueError(f"{path}: {one_line(error)}") from None


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    path = directory / WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; a model directory holds {CONFIG_FILE} and {WEIGHTS_FILE}")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path}: not a readable safetensors file ({error})") from None


def load(name_or_path: str | os.PathLike) -> tuple[SR3UNet, ModelSpec]:
    """The float32 U-Net on the CPU, with its weights, and the directory's spec."""
    directory = resolve(name_or_path)
    spec = read_spec(directory)
    model = SR3UNet(spec.model)
    try:
        model.load_state_dict(read_weights(directory))
    except RuntimeError as error:
        raise ValueError(f"{directory / WEIGHTS_FILE}: does not match {CONFIG_FILE} ({one_line(error)})") from None
    return model, spec


def write(directory: str | os.PathLike, state_dict: Mapping[str, torch.Tensor], spec: ModelSpec, *,
          weights_dtype: torch.dtype | None = None) -> Path:
    """Write model.safetensors then config.json into `directory` (created if needed), each
    atomically. `weights_dtype` stores the weights in another precision (e.g. float16)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", weights_dtype or v.dtype).contiguous() for k, v in state_dict.items()}
    with atomic_path(directory / WEIGHTS_FILE) as tmp:
        # Bytes written into atomic_path's file keep the user's umask; save_file's own files are 0600.
        tmp.write_bytes(save(state, metadata={"format": FORMAT_NAME}))
    with atomic_path(directory / CONFIG_FILE) as tmp:
        tmp.write_text(json.dumps(spec.to_document(), indent=2, sort_keys=True) + "\n")
    return directory


def replace(target: Path, state_dict: Mapping[str, torch.Tensor], spec: ModelSpec, *, tag: str,
            weights_dtype: torch.dtype | None = None) -> Path:
    """Write a whole model directory at `target`, replacing any there, never leaving a half-written
    one: it is written into a hidden sibling and swapped in with two renames. A process killed
    between them leaves the previous directory under a hidden name that `recover` puts back."""
    staging = target.with_name(f".{target.name}.{tag}.tmp")
    retired = target.with_name(f".{target.name}.{tag}.old")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        write(staging, state_dict, spec, weights_dtype=weights_dtype)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if target.exists():
        os.replace(target, retired)
    os.replace(staging, target)
    shutil.rmtree(retired, ignore_errors=True)
    return target


def recover(target: Path) -> None:
    """Undo what a process killed inside `replace` left: put a retired directory back if the new
    one never arrived, and delete staging leftovers."""
    leftovers = sorted(target.parent.glob(f".{target.name}.*"), key=lambda p: p.stat().st_mtime)
    retired = [p for p in leftovers if p.name.endswith(".old")]
    if not target.exists() and retired:
        os.replace(retired[-1], target)
    for path in leftovers:
        shutil.rmtree(path, ignore_errors=True)
