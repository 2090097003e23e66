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
file and the field; nothing is unpickled. The weights are checked against config.json before
any network is built or any tensor is read: the safetensors header (at most
`MAX_HEADER_BYTES`) must name exactly the parameters of config.json's network with their
shapes (read off the network built on the meta device, which allocates nothing), and the file
must hold their bytes in the dtypes it declares; so a config.json edited to ask for another or
a larger network is refused in one short line instead of allocated. Each file is written to a
temporary name and renamed (`write`); `replace` swaps a whole directory in, so a reader never sees a mix of
two versions. Models bundled with the package live under `sr3_engine/assets/<name>/` and
can be named instead of a path.
"""

from __future__ import annotations

import dataclasses
import json
import math
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
# demo-x4's header is 19 KB for 187 tensors: 16 MiB describes some 150,000, far past any U-Net here,
# and bounds what a hostile header length makes us read (safetensors' own bound is 100 MB).
MAX_HEADER_BYTES = 16 * 2**20
# The float dtypes a weights file may store (safetensors' names), in bytes per element.
FLOAT_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1}
# A mismatch names the first differences that fit in this many characters (one at least) and
# counts the rest, so its line stays short whatever the config asks for.
SHOWN_CHARS = 140


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


def parameter_shapes(config: UNetConfig) -> dict[str, tuple[int, ...]]:
    """The names and shapes of the state_dict of `config`'s network, without allocating it."""
    with torch.device("meta"):
        model = SR3UNet(config)
    return {name: tuple(value.shape) for name, value in model.state_dict().items()}


def _shown(text: str, limit: int = 48) -> str:
    # Names come from a file that may be hostile: escaped to stay on one line, and clipped.
    text = ascii(text)[1:-1]
    return text if len(text) <= limit else text[:limit - 3] + "..."


def shape_mismatch(expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]]) -> str | None:
    """None when `found` has exactly `expected`'s names and shapes; else the first differences
    (in `expected`'s order, then the unexpected names) and how many more there are."""
    differences = []
    for name, shape in expected.items():
        if name not in found:
            differences.append(f"missing {_shown(name)}")
        elif tuple(found[name]) != shape:
            differences.append(f"{_shown(name)} is {_shown(str(list(found[name])), 24)}, not {list(shape)}")
    differences += [f"unexpected {_shown(name)}" for name in found if name not in expected]
    if not differences:
        return None
    shown = 1
    while shown < len(differences) and len("; ".join(differences[:shown + 1])) <= SHOWN_CHARS:
        shown += 1
    more = len(differences) - shown
    return "; ".join(differences[:shown]) + (f"; and {more:,} more differences" if more else "")


def read_header(path: Path) -> tuple[dict[str, tuple[str, tuple[int, ...]]], int]:
    """The dtype and shape of every tensor of a safetensors file, and how many bytes of tensor
    data follow the header, read without reading any tensor."""
    with open(path, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        prefix = file.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{path}: not a readable safetensors file (shorter than the 8 bytes of its header length)")
        length = int.from_bytes(prefix, "little")
        if length > MAX_HEADER_BYTES:
            raise ValueError(f"{path}: declares a {length:,}-byte safetensors header; more than the "
                             f"{MAX_HEADER_BYTES:,} bytes read")
        if 8 + length > size:
            raise ValueError(f"{path}: not a readable safetensors file (a {length:,}-byte header declared in "
                             f"{size:,} bytes)")
        raw = file.read(length)
    try:
        header = json.loads(raw)
    # ValueError holds JSON and UTF-8 errors and numbers too long to convert; RecursionError, nesting.
    except (ValueError, RecursionError) as error:
        raise ValueError(f"{path}: not a readable safetensors file (its header is not valid JSON: "
                         f"{one_line(error)})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: not a readable safetensors file (its header is not a JSON object)")
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype = entry.get("dtype") if isinstance(entry, dict) else None
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if dtype not in FLOAT_DTYPES:
            raise ValueError(f"{path}: {_shown(name)}: dtype {_shown(str(dtype), 24)} is not one of "
                             f"{sorted(FLOAT_DTYPES)}")
        if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape):
            raise ValueError(f"{path}: {_shown(name)}: shape {_shown(str(shape), 24)} is not a list of sizes")
        tensors[name] = (dtype, tuple(shape))
    return tensors, size - 8 - length


def read_weights(directory: Path, config: UNetConfig) -> dict[str, torch.Tensor]:
    """model.safetensors of `directory`, refused before any tensor is read unless its header
    names exactly the parameters of `config`'s network with their shapes and the file holds
    their bytes."""
    path = directory / WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; a model directory holds {CONFIG_FILE} and {WEIGHTS_FILE}")
    tensors, data_bytes = read_header(path)
    expected = parameter_shapes(config)
    mismatch = shape_mismatch(expected, {name: shape for name, (_, shape) in tensors.items()})
    if mismatch is not None:
        raise ValueError(f"{path}: does not match {CONFIG_FILE} ({mismatch})")
    # The header's shapes are only claims: their bytes must be in the file too, counted in the
    # dtypes the header gives them (a float16 file holds half the bytes of float32 parameters).
    needed = sum(math.prod(shape) * FLOAT_DTYPES[tensors[name][0]] for name, shape in expected.items())
    if needed > data_bytes:
        raise ValueError(f"{path}: {CONFIG_FILE}'s network needs {needed:,} bytes of weights in the dtypes the "
                         f"header gives; the file holds {data_bytes:,}")
    try:
        weights = load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path}: not a readable safetensors file ({error})") from None
    # The file may have been replaced since its header was read.
    mismatch = shape_mismatch(expected, {name: tuple(value.shape) for name, value in weights.items()})
    if mismatch is not None:
        raise ValueError(f"{path}: does not match {CONFIG_FILE} ({mismatch})")
    return weights


def load(name_or_path: str | os.PathLike) -> tuple[SR3UNet, ModelSpec]:
    """The float32 U-Net on the CPU, with its weights, and the directory's spec."""
    directory = resolve(name_or_path)
    spec = read_spec(directory)
    weights = read_weights(directory, spec.model)
    model = SR3UNet(spec.model)
    model.load_state_dict(weights)
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
