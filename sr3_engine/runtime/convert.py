"""Import checkpoints of the most used open SR3 implementation into a model directory.

That implementation saves `I{iter}_E{epoch}_gen.pth`: the state_dict of its diffusion wrapper,
every U-Net key under `denoise_fn.` (our SR3UNet has the same keys and shapes), plus twelve
float32 buffers of its noise schedule (`SCHEDULE_BUFFERS`); DataParallel runs add `module.`.
Its JSON configs allow `//` comments; `model.unet`, `model.beta_schedule.{train,val}`,
`model.diffusion` and `datasets.*.{l,r}_resolution` describe the network, the schedules and
the scale. Its condition is PIL's bicubic on 8-bit images, so converted models record the
`pil-bicubic` resampler and are served with the condition they were trained on.

The file is read with `torch.load(weights_only=True)` and nothing else: a file that needs
more unpickling is refused. A .pth has no header short of that (restricted) unpickling, so its
tensors are loaded, which takes no more memory than the file's size (compressed records, which
torch.save never writes and which could inflate far past it, are refused first), and their
names and shapes are checked against the network the config describes
(`model_dir.shape_mismatch`, one short line) before that network is built. The schedule buffers are checked against each other and
against the config, then dropped; the training schedule they hold is kept in the model
directory's `train_schedule` entry, and the default inference schedule is `INFERENCE_STEPS`
steps respaced from the config's `val` schedule (the same noise levels, 20x fewer steps than
the usual 2000).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from ..config import ScheduleConfig, UNetConfig
from ..io import one_line
from ..samplers import SamplerConfig
from ..schedules import NoiseSchedule
from ..unet import SR3UNet
from . import model_dir

SCHEDULE_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
)
PREFIXES = ("module.", "denoise_fn.")
INFERENCE_STEPS = 100
# Their schedule names and ours; `jsd` ends with beta = 1 (gamma_T = 0), which no reverse step can start from.
SCHEDULE_KINDS = {"linear": ("linear", {}), "quad": ("quad", {}), "const": ("const", {}),
                  "cosine": ("cosine", {}), "warmup10": ("warmup", {"warmup_frac": 0.1}),
                  "warmup50": ("warmup", {"warmup_frac": 0.5})}
UNMAPPABLE = {"jsd": "its last beta is 1 (gamma_T = 0), so 1/sqrt(gamma_T) is infinite and no sampler can use it"}
# float32 buffers of a float64 schedule: relative agreement expected to a few float32 ulps.
BUFFER_RTOL = 1e-5


class ConvertError(ValueError):
    """A checkpoint or config that cannot be converted; one line naming the file and the field."""


def strip_comments(text: str) -> str:
    """JSON with `//` line comments (outside strings) as plain JSON."""
    out, in_string, escaped, i = [], False, False, 0
    while i < len(text):
        char = text[i]
        if in_string:
            out.append(char)
            in_string = not (char == '"' and not escaped)
            escaped = char == "\\" and not escaped
        elif char == '"':
            in_string = True
            out.append(char)
        elif text.startswith("//", i):
            while i < len(text) and text[i] != "\n":
                i += 1
            continue
        else:
            out.append(char)
        i += 1
    return "".join(out)


def read_their_config(path: Path) -> dict[str, Any]:
    try:
        document = json.loads(strip_comments(path.read_text()))
    except (OSError, UnicodeDecodeError) as error:
        raise ConvertError(f"{path}: cannot read it ({one_line(error)})") from None
    except json.JSONDecodeError as error:
        raise ConvertError(f"{path}: not valid JSON even without // comments ({error})") from None
    if not isinstance(document, dict):
        raise ConvertError(f"{path}: expected a JSON object")
    return document


def _field(document: Mapping[str, Any], dotted: str, path: Path, default: Any = KeyError) -> Any:
    value: Any = document
    for part in dotted.split("."):
        if not isinstance(value, Mapping) or part not in value:
            if default is KeyError:
                raise ConvertError(f"{path}: {dotted}: missing")
            return default
        value = value[part]
    return value


def _int_field(document: Mapping[str, Any], dotted: str, path: Path, default: Any = KeyError) -> int:
    value = _field(document, dotted, path, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConvertError(f"{path}: {dotted}: expected an integer; got {value!r}")
    return value


def load_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a `_gen.pth` file, loaded without unpickling anything but tensors."""
    if path.name.endswith("_opt.pth"):
        raise ConvertError(f"{path}: an optimizer state (_opt.pth); convert the matching _gen.pth file")
    if not path.is_file():
        raise ConvertError(f"{path}: no such file")
    # torch.save stores its records uncompressed; a compressed one could inflate to far more
    # memory than the file's size, so it is refused before anything is read.
    try:
        with zipfile.ZipFile(path) as archive:
            packed = any(info.compress_type != zipfile.ZIP_STORED for info in archive.infolist())
    except zipfile.BadZipFile:
        packed = False  # torch's legacy format, whose storages are read from the file and stop at its end
    except OSError as error:
        raise ConvertError(f"{path}: not a readable PyTorch checkpoint ({one_line(error)})") from None
    if packed:
        raise ConvertError(f"{path}: holds compressed records, which torch.save never writes; refused rather than "
                           "inflated")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else "unsupported content"
        raise ConvertError(f"{path}: holds more than tensors, which is refused rather than unpickled ({first})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise ConvertError(f"{path}: not a readable PyTorch checkpoint ({one_line(error)})") from None
    if not isinstance(state, Mapping) or not state:
        raise ConvertError(f"{path}: expected a state_dict (a mapping of names to tensors)")
    if {"optimizer", "iter", "epoch"} & set(state):
        raise ConvertError(f"{path}: an optimizer state (it has {sorted({'optimizer', 'iter', 'epoch'} & set(state))}); "
                           "convert the matching _gen.pth file")
    not_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ConvertError(f"{path}: {not_tensors[0]}: expected a tensor; got {type(state[not_tensors[0]]).__name__}")
    stripped = {}
    for key, value in state.items():
        for prefix in PREFIXES:
            key = key.removeprefix(prefix)
        stripped[key] = value
    return stripped


def schedule_from_theirs(entry: Any, path: Path, phase: str) -> ScheduleConfig:
    """Their `model.beta_schedule.<phase>` as our ScheduleConfig."""
    where = f"model.beta_schedule.{phase}"
    if not isinstance(entry, Mapping):
        raise ConvertError(f"{path}: {where}: expected an object")
    name = entry.get("schedule")
    if name in UNMAPPABLE:
        raise ConvertError(f"{path}: {where}.schedule: {name!r} cannot be mapped: {UNMAPPABLE[name]}")
    if name not in SCHEDULE_KINDS:
        raise ConvertError(f"{path}: {where}.schedule: unknown schedule {name!r} (known: {sorted(SCHEDULE_KINDS)})")
    kind, extra = SCHEDULE_KINDS[name]
    steps = _int_field(entry, "n_timestep", path)
    start, end = entry.get("linear_start", 1e-4), entry.get("linear_end", 2e-2)
    if kind == "const":
        start = end
    try:
        return ScheduleConfig(kind, steps, float(start), float(end), **extra)
    except (TypeError, ValueError) as error:
        raise ConvertError(f"{path}: {where}: {one_line(error)}") from None


def their_buffers(betas: np.ndarray) -> dict[str, np.ndarray]:
    """The twelve schedule buffers exactly as that implementation derives them from float64 betas."""
    alphas = 1.0 - betas
    gammas = np.cumprod(alphas)
    gammas_prev = np.append(1.0, gammas[:-1])
    variance = betas * (1.0 - gammas_prev) / (1.0 - gammas)
    return {
        "betas": betas, "alphas_cumprod": gammas, "alphas_cumprod_prev": gammas_prev,
        "sqrt_alphas_cumprod": np.sqrt(gammas), "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - gammas),
        "log_one_minus_alphas_cumprod": np.log(1.0 - gammas), "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / gammas),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / gammas - 1.0), "posterior_variance": variance,
        "posterior_log_variance_clipped": np.log(np.maximum(variance, 1e-20)),
        "posterior_mean_coef1": betas * np.sqrt(gammas_prev) / (1.0 - gammas),
        "posterior_mean_coef2": (1.0 - gammas_prev) * np.sqrt(alphas) / (1.0 - gammas),
    }


def _matches(buffers: Mapping[str, torch.Tensor], betas: np.ndarray) -> str | None:
    """None when the checkpoint's buffers are those of `betas`, else the first that differs."""
    for name, expected in their_buffers(betas).items():
        found = buffers[name].double().numpy()
        if found.shape != expected.shape:
            return f"{name} has {found.shape[0]} steps, not {expected.shape[0]}"
        scale = np.maximum(np.abs(expected), 1e-30)
        finite = np.isfinite(expected)
        if not np.all(np.abs(found[finite] - expected[finite]) <= BUFFER_RTOL * scale[finite] + 1e-12):
            return f"{name} differs"
    return None


def _inferred_schedule(betas: np.ndarray) -> ScheduleConfig | None:
    """A schedule of ours whose betas are `betas` (float32-recovered), tried kind by kind."""
    # The buffers are float32: the shortest decimal that rounds to the same float32 is what the
    # config said (1e-06, not 9.99999997e-07).
    steps, start, end = len(betas), float(str(np.float32(betas[0]))), float(str(np.float32(betas[-1])))
    candidates = [("linear", start, end, {}), ("quad", start, end, {}), ("const", end, end, {}),
                  ("cosine", 1e-6, 1e-2, {}), ("warmup", start, end, {"warmup_frac": 0.1}),
                  ("warmup", start, end, {"warmup_frac": 0.5})]
    for kind, start_, end_, extra in candidates:
        try:
            config = ScheduleConfig(kind, steps, start_, end_, **extra)
            candidate = NoiseSchedule.from_config(config).betas
        except ValueError:
            continue
        if np.allclose(candidate, betas, rtol=BUFFER_RTOL, atol=1e-12):
            return config
    return None


def training_schedule(buffers: Mapping[str, torch.Tensor], configured: dict[str, ScheduleConfig], path: Path,
                      config_path: Path | None) -> ScheduleConfig | None:
    """The schedule the checkpoint's buffers hold, checked against the config's train (or val) one."""
    missing = [name for name in SCHEDULE_BUFFERS if name not in buffers]
    if len(missing) == len(SCHEDULE_BUFFERS):
        return configured.get("train")
    if missing:
        raise ConvertError(f"{path}: schedule buffers {missing} are missing (the others are there)")
    for phase, config in configured.items():
        if _matches(buffers, NoiseSchedule.from_config(config).betas) is None:
            return config
    if configured:
        reason = _matches(buffers, NoiseSchedule.from_config(configured["train"]).betas)
        raise ConvertError(f"{path}: the schedule buffers do not match {config_path}'s model.beta_schedule.train "
                           f"({reason})")
    betas = buffers["betas"].double().numpy()
    inferred = _inferred_schedule(betas)
    if inferred is None or _matches(buffers, NoiseSchedule.from_config(inferred).betas) is not None:
        raise ConvertError(f"{path}: betas: not a linear, quad, const, cosine or warmup schedule; pass --config")
    return inferred


@dataclasses.dataclass(frozen=True)
class Conversion:
    """What `convert` wrote and what it inferred rather than read."""

    directory: Path
    spec: model_dir.ModelSpec
    train_schedule: ScheduleConfig | None
    inferred: tuple[str, ...]


def unet_from_their_config(document: Mapping[str, Any], path: Path) -> UNetConfig:
    which = _field(document, "model.which_model_G", path, "sr3")
    if which != "sr3":
        raise ConvertError(f"{path}: model.which_model_G: {which!r} is not the SR3 network (only 'sr3' converts)")
    if _field(document, "model.diffusion.conditional", path, True) is not True:
        raise ConvertError(f"{path}: model.diffusion.conditional: an unconditional model is not a super-resolver")
    channels = _int_field(document, "model.unet.out_channel", path, 3)
    in_channels = _int_field(document, "model.unet.in_channel", path, 2 * channels)
    if in_channels != 2 * channels:
        raise ConvertError(f"{path}: model.unet.in_channel: {in_channels}; SR3 takes [x_up, y_t], "
                           f"2 x out_channel = {2 * channels}")
    try:
        return UNetConfig.from_dict({
            "channels": channels,
            "inner_channels": _int_field(document, "model.unet.inner_channel", path),
            "channel_mults": list(_field(document, "model.unet.channel_multiplier", path)),
            "res_blocks": _int_field(document, "model.unet.res_blocks", path),
            "attn_resolutions": list(_field(document, "model.unet.attn_res", path)),
            "dropout": float(_field(document, "model.unet.dropout", path, 0.0)),
            "norm_groups": _int_field(document, "model.unet.norm_groups", path, 32),
            "image_size": _int_field(document, "model.diffusion.image_size", path),
        })
    except (TypeError, ValueError) as error:
        raise ConvertError(f"{path}: model.unet: {one_line(error)}") from None


def scale_from_their_config(document: Mapping[str, Any], path: Path) -> int:
    for phase in ("train", "val"):
        low = _field(document, f"datasets.{phase}.l_resolution", path, None)
        high = _field(document, f"datasets.{phase}.r_resolution", path, None)
        if low is None or high is None:
            continue
        if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (low, high)) or high % low:
            raise ConvertError(f"{path}: datasets.{phase}: r_resolution {high!r} / l_resolution {low!r} is not a "
                               "whole scale")
        return high // low
    raise ConvertError(f"{path}: datasets.train.l_resolution and r_resolution: missing (they give the scale)")


def unet_from_shapes(weights: Mapping[str, torch.Tensor], image_size: int | None, norm_groups: int | None,
                     path: Path) -> tuple[UNetConfig, list[str]]:
    """The architecture read off the tensors; what shapes cannot tell must be given."""
    def shape(key: str) -> tuple[int, ...]:
        if key not in weights:
            raise ConvertError(f"{path}: {key}: missing; not an SR3 U-Net checkpoint")
        return tuple(weights[key].shape)

    inner, in_channels = shape("downs.0.weight")[:2]
    channels = shape("final_conv.block.3.weight")[0]
    if in_channels != 2 * channels:
        raise ConvertError(f"{path}: downs.0.weight takes {in_channels} channels; SR3 takes 2 x {channels}")
    # downs.1.. are residual blocks (with res_block.*) and downsamplers (conv.*); count per level.
    levels, blocks, attention_levels, widths = [], 0, set(), []
    index = 1
    while f"downs.{index}.res_block.block1.block.3.weight" in weights or f"downs.{index}.conv.weight" in weights:
        if f"downs.{index}.conv.weight" in weights:
            levels.append(blocks)
            blocks = 0
        else:
            blocks += 1
            widths.append(shape(f"downs.{index}.res_block.block1.block.3.weight")[0])
            if any(k.startswith(f"downs.{index}.attn.") for k in weights):
                attention_levels.add(len(levels))
        index += 1
    levels.append(blocks)
    if len(set(levels)) != 1 or not levels[0]:
        raise ConvertError(f"{path}: downs: levels hold {levels} residual blocks; expected the same number in each")
    res_blocks = levels[0]
    mults = [widths[level * res_blocks] // inner for level in range(len(levels))]
    needed = []
    if attention_levels and image_size is None:
        needed.append("--image-size (it decides at which feature-map sizes attention sits)")
    if norm_groups is None:
        needed.append("--norm-groups (GroupNorm parameters do not show the number of groups)")
    if needed:
        raise ConvertError(f"{path}: without --config the shapes cannot tell {' and '.join(needed)}")
    size = image_size if image_size is not None else 2 ** len(mults)
    attn = sorted(size // 2**level for level in attention_levels)
    try:
        config = UNetConfig(channels=channels, inner_channels=inner, channel_mults=tuple(mults), res_blocks=res_blocks,
                            attn_resolutions=tuple(attn), norm_groups=norm_groups, image_size=size)
    except ValueError as error:
        raise ConvertError(f"{path}: {one_line(error)}") from None
    return config, ["model from tensor shapes"]


def convert(checkpoint: str | os.PathLike, out: str | os.PathLike, *, config: str | os.PathLike | None = None,
            image_size: int | None = None, norm_groups: int | None = None, scale: int | None = None,
            steps: int = INFERENCE_STEPS) -> Conversion:
    """Convert `checkpoint` (a _gen.pth) into the model directory `out`, written atomically."""
    checkpoint, out = Path(checkpoint), Path(out)
    tensors = load_checkpoint(checkpoint)
    buffers = {k: v for k, v in tensors.items() if k in SCHEDULE_BUFFERS}
    weights = {k: v for k, v in tensors.items() if k not in SCHEDULE_BUFFERS}
    config_path = Path(config) if config is not None else None
    configured: dict[str, ScheduleConfig] = {}
    inferred: list[str] = []
    if config_path is not None:
        document = read_their_config(config_path)
        unet = unet_from_their_config(document, config_path)
        for phase in ("train", "val"):
            entry = _field(document, f"model.beta_schedule.{phase}", config_path, None)
            if entry is not None:
                configured[phase] = schedule_from_theirs(entry, config_path, phase)
        if "train" not in configured:
            raise ConvertError(f"{config_path}: model.beta_schedule.train: missing")
        model_scale = scale_from_their_config(document, config_path)
        if scale is not None and scale != model_scale:
            raise ConvertError(f"{config_path}: datasets give scale x{model_scale}, not --scale {scale}")
    else:
        unet, inferred = unet_from_shapes(weights, image_size, norm_groups, checkpoint)
        if scale is None:
            raise ConvertError(f"{checkpoint}: without --config, --scale is required (their config's "
                               "r_resolution / l_resolution)")
        model_scale = scale
    train = training_schedule(buffers, configured, checkpoint, config_path)
    if config_path is None:
        inferred.append("training schedule from the schedule buffers")
    # Checked before the network is built: a config asking for a network larger than the
    # checkpoint's tensors would otherwise be allocated first.
    mismatch = model_dir.shape_mismatch(model_dir.parameter_shapes(unet),
                                        {name: tuple(value.shape) for name, value in weights.items()})
    if mismatch is not None:
        network = "the config's network" if config_path else "the inferred network"
        raise ConvertError(f"{checkpoint}: does not fit {network} ({mismatch})")
    model = SR3UNet(unet)
    model.load_state_dict(weights)
    base = configured.get("val", train)
    if base is None:
        raise ConvertError(f"{checkpoint}: no schedule buffers and no --config: nothing says the noise schedule")
    inference = dataclasses.replace(base, respace=min(steps, base.steps))
    try:
        spec = model_dir.ModelSpec(unet, inference, SamplerConfig("ancestral"), model_scale,
                                   resampler="pil-bicubic", train_schedule=train)
    except ValueError as error:
        raise ConvertError(f"{config_path or checkpoint}: {one_line(error)}") from None
    model_dir.replace(out, model.state_dict(), spec, tag=f"{os.getpid()}-convert")
    return Conversion(out, spec, train, tuple(inferred))
