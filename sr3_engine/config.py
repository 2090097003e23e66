"""Frozen, JSON-round-trippable configuration objects.

Every config is a frozen dataclass so it can be hashed, shared between threads and
written next to a checkpoint without anyone mutating it afterwards. (SamplerConfig, whose
names come from the sampler registry, lives with the samplers in `samplers.py`.) `to_dict` gives
plain JSON types; `from_dict` rejects unknown keys so a typo in a config file is an
error instead of a silently ignored setting.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping, TypeVar

T = TypeVar("T", bound="JsonConfig")

NOISE_LEVEL_INPUTS = ("sqrt_gamma", "gamma")
SCHEDULE_KINDS = ("linear", "cosine", "warmup", "quad", "const")


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
            kwargs[name] = tuple(value) if isinstance(default, tuple) and value is not None else value
        return cls(**kwargs)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls: type[T], text: str) -> T:
        return cls.from_dict(json.loads(text))


def _to_json_value(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    return value


def _check_choice(owner: str, field: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{owner}.{field} must be one of {choices}; got {value!r}")


@dataclasses.dataclass(frozen=True)
class UNetConfig(JsonConfig):
    """The SR3 U-Net, laid out like the most used open SR3 implementation.

    `image_size` only decides at which feature-map sizes attention is placed
    (`attn_resolutions`); the network itself runs on any H, W divisible by
    2 ** (len(channel_mults) - 1).
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

    def __post_init__(self) -> None:
        for name in ("channels", "inner_channels", "res_blocks", "norm_groups", "image_size", "num_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < (0 if name == "res_blocks" else 1):
                raise ValueError(f"UNetConfig.{name} must be a positive integer; got {value!r}")
        if not self.channel_mults or any(int(m) < 1 for m in self.channel_mults):
            raise ValueError(f"UNetConfig.channel_mults must be positive integers; got {self.channel_mults!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"UNetConfig.dropout must be in [0, 1); got {self.dropout!r}")
        _check_choice("UNetConfig", "noise_level_input", self.noise_level_input, NOISE_LEVEL_INPUTS)
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
        _check_choice("ScheduleConfig", "kind", self.kind, SCHEDULE_KINDS)
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"ScheduleConfig.steps must be a positive integer; got {self.steps!r}")
        if self.kind != "cosine" and not 0.0 < self.start <= self.end < 1.0:
            raise ValueError(f"ScheduleConfig needs 0 < start <= end < 1; got start={self.start}, end={self.end}")
        if not 0.0 < self.warmup_frac <= 1.0:
            raise ValueError(f"ScheduleConfig.warmup_frac must be in (0, 1]; got {self.warmup_frac}")
        if self.respace is not None and not (isinstance(self.respace, int) and 1 <= self.respace <= self.steps):
            raise ValueError(f"ScheduleConfig.respace must be in [1, {self.steps}]; got {self.respace!r}")
