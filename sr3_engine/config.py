"""Frozen, JSON-round-trippable configuration objects.

Every config is a frozen dataclass so it can be hashed, shared between threads and
written next to a checkpoint without anyone mutating it afterwards. (SamplerConfig, whose
names come from the sampler registry, lives with the samplers in `samplers.py`.) `to_dict` gives
plain JSON types; `from_dict` rejects unknown keys so a typo in a config file is an
error instead of a silently ignored setting. Every field holds exactly its declared type
(`check_field_types`): a config file is user input, and "122" for (1, 2, 2) or true for 1
must fail here with the field's name, not later inside the network's arithmetic.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from typing import Any, Mapping, TypeVar

T = TypeVar("T", bound="JsonConfig")

NOISE_LEVEL_INPUTS = ("sqrt_gamma", "gamma")
# What the network's output estimates (diffusion.PREDICTION_TARGETS has the equations).
PREDICTIONS = ("eps", "y0", "v")
SCHEDULE_KINDS = ("linear", "cosine", "warmup", "quad", "const")
# Far beyond any published schedule (SR3 trains with 2000 steps); its float64 tables already
# take a few MB, and a typo such as 10**10 must not become an attempt to allocate 80 GB.
MAX_SCHEDULE_STEPS = 100_000


class JsonConfig:
    def to_dict(self) -> dict[str, Any]:
        return {f.name: _to_json_value(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls: type[T], data: Mapping[str, Any]) -> T:
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown keys {unknown}; expected a subset of {sorted(known)}")
        kwargs = {}
        for name, value in data.items():
            default = known[name].default
            kwargs[name] = tuple(value) if isinstance(default, tuple) and isinstance(value, list) else value
        return cls(**kwargs)

    def check_field_types(self) -> None:
        """Raise ValueError naming the first field whose value is not of its declared type:
        an int field takes an int (not a bool, string or float), a float field any finite
        number, a tuple field a tuple (a JSON list) of its items' type."""
        hints = typing.get_type_hints(type(self))
        for field in dataclasses.fields(self):
            value, kind = getattr(self, field.name), hints[field.name]
            if not _is_of_type(value, kind):
                raise ValueError(f"{type(self).__name__}.{field.name} must be {_type_name(kind)}; got {value!r}")

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls: type[T], text: str) -> T:
        return cls.from_dict(json.loads(text))


def _to_json_value(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    return value


def _is_of_type(value: Any, kind: Any) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if kind is str:
        return isinstance(value, str)
    if kind is type(None):
        return value is None
    items = typing.get_args(kind)
    if typing.get_origin(kind) is tuple:
        return isinstance(value, tuple) and all(_is_of_type(item, items[0]) for item in value)
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        return any(_is_of_type(value, item) for item in items)
    raise TypeError(f"check_field_types has no rule for {kind}")


def _type_name(kind: Any) -> str:
    names = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string",
             type(None): "null"}
    if kind in names:
        return names[kind]
    items = typing.get_args(kind)
    if typing.get_origin(kind) is tuple:
        return f"a list of {_type_name(items[0]).removeprefix('an ').removeprefix('a ')}s"
    return " or ".join(_type_name(item) for item in items)


def _check_choice(owner: str, field: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{owner}.{field} must be one of {choices}; got {value!r}")


@dataclasses.dataclass(frozen=True)
class UNetConfig(JsonConfig):
    """The SR3 U-Net, laid out like the most used open SR3 implementation.

    `image_size` only decides at which feature-map sizes attention is placed
    (`attn_resolutions`); the network itself runs on any H, W divisible by
    2 ** (len(channel_mults) - 1).

    `prediction` is what the output estimates: the noise eps (SR3, and every imported
    checkpoint), the clean image y0 (the paper's alternative) or the velocity
    v = sqrt(gamma) eps - sqrt(1 - gamma) y0 (Salimans and Ho 2022). It changes no parameter;
    config files without it are eps models.

    `residual_scale` is what the reverse process diffuses: None, the image itself (SR3, and
    every imported checkpoint), or a number s, the residual over the condition
    s (y0 - x_up) (`diffusion.to_diffused`). It changes no parameter either; config files
    without it diffuse the image.
    """

    channels: int = 3
    inner_channels: int = 64
    channel_mults: tuple[int, ...] = (1, 2, 4, 8, 8)
    res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.0
    norm_groups: int = 32
    image_size: int = 128
    num_heads: int = 1
    skip_rescale: bool = False
    film: bool = False
    noise_level_input: str = "sqrt_gamma"
    prediction: str = "eps"
    residual_scale: float | None = None

    def __post_init__(self) -> None:
        self.check_field_types()
        if self.residual_scale is not None and self.residual_scale <= 0.0:
            raise ValueError(f"UNetConfig.residual_scale must be positive or null; got {self.residual_scale!r}")
        for name in ("channels", "inner_channels", "res_blocks", "norm_groups", "image_size", "num_heads"):
            value = getattr(self, name)
            if value < (0 if name == "res_blocks" else 1):
                raise ValueError(f"UNetConfig.{name} must be a positive integer; got {value!r}")
        if not self.channel_mults or any(m < 1 for m in self.channel_mults):
            raise ValueError(f"UNetConfig.channel_mults must be positive integers; got {self.channel_mults!r}")
        if any(r < 1 for r in self.attn_resolutions):
            raise ValueError(f"UNetConfig.attn_resolutions must be positive integers; got {self.attn_resolutions!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"UNetConfig.dropout must be in [0, 1); got {self.dropout!r}")
        _check_choice("UNetConfig", "noise_level_input", self.noise_level_input, NOISE_LEVEL_INPUTS)
        _check_choice("UNetConfig", "prediction", self.prediction, PREDICTIONS)
        for mult in set(self.channel_mults) | {1}:
            width = self.inner_channels * mult
            if width % self.norm_groups:
                raise ValueError(
                    f"UNetConfig: {width} channels are not divisible by norm_groups={self.norm_groups}"
                )
            if width % self.num_heads:
                raise ValueError(f"UNetConfig: {width} channels are not divisible by num_heads={self.num_heads}")

    @property
    def size_multiple(self) -> int:
        """Input height and width must be multiples of this."""
        return 2 ** (len(self.channel_mults) - 1)

    @classmethod
    def named(cls, name: str) -> "UNetConfig":
        try:
            return NAMED_UNET_CONFIGS[name]
        except KeyError:
            raise ValueError(f"unknown model config {name!r}; named configs: {sorted(NAMED_UNET_CONFIGS)}") from None


NAMED_UNET_CONFIGS: dict[str, UNetConfig] = {
    "tiny": UNetConfig(
        inner_channels=16, channel_mults=(1, 2, 2), res_blocks=1, attn_resolutions=(8,),
        norm_groups=8, image_size=32,
    ),
    "sr3-16-128": UNetConfig(
        inner_channels=64, channel_mults=(1, 2, 4, 8, 8), res_blocks=2, attn_resolutions=(16,),
        dropout=0.2, norm_groups=32, image_size=128,
    ),
    "sr3-64-512": UNetConfig(
        inner_channels=64, channel_mults=(1, 2, 4, 8, 16), res_blocks=1, attn_resolutions=(),
        dropout=0.0, norm_groups=16, image_size=512,
    ),
}


@dataclasses.dataclass(frozen=True)
class ScheduleConfig(JsonConfig):
    """A beta schedule over `steps` training steps, optionally respaced to `respace` steps."""

    kind: str = "linear"
    steps: int = 2000
    start: float = 1e-6
    end: float = 1e-2
    cosine_s: float = 8e-3
    warmup_frac: float = 0.1
    respace: int | None = None

    def __post_init__(self) -> None:
        self.check_field_types()
        _check_choice("ScheduleConfig", "kind", self.kind, SCHEDULE_KINDS)
        if not 1 <= self.steps <= MAX_SCHEDULE_STEPS:
            raise ValueError(f"ScheduleConfig.steps must be an integer in [1, {MAX_SCHEDULE_STEPS}]; "
                             f"got {self.steps!r}")
        if self.kind != "cosine" and not 0.0 < self.start <= self.end < 1.0:
            raise ValueError(f"ScheduleConfig needs 0 < start <= end < 1; got start={self.start}, end={self.end}")
        if not 0.0 < self.warmup_frac <= 1.0:
            raise ValueError(f"ScheduleConfig.warmup_frac must be in (0, 1]; got {self.warmup_frac}")
        if self.respace is not None and not 1 <= self.respace <= self.steps:
            raise ValueError(f"ScheduleConfig.respace must be in [1, {self.steps}]; got {self.respace!r}")
