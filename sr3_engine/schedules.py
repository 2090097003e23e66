"""Noise schedules and every table derived from them, in float64.

Index i of each table is diffusion step t = i + 1 (t runs 1..T). With
alpha_t = 1 - beta_t, gamma_t = prod_{s<=t} alpha_s and gamma_0 = 1:

    coef1_t = sqrt(gamma_{t-1}) (1 - alpha_t) / (1 - gamma_t)        (eq. 4, on y_0)
    coef2_t = sqrt(alpha_t) (1 - gamma_{t-1}) / (1 - gamma_t)         (eq. 4, on y_t)
    posterior_sigma_t = sqrt((1 - gamma_{t-1}) (1 - alpha_t) / (1 - gamma_t))

The per-step y0_hat coefficients depend on the model's prediction target as well, so they
are made with the plan (`diffusion.y0_coefficients`). Tables are computed once in float64 and
only cast at the point of use, because 1 - gamma_t and 1/gamma_t lose most of their digits in
float32 near both ends.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import torch

from .config import ScheduleConfig


def _frozen(array: np.ndarray) -> np.ndarray:
    array = np.ascontiguousarray(array, dtype=np.float64)
    array.setflags(write=False)
    return array


def linear_betas(steps: int, start: float, end: float) -> np.ndarray:
    return np.linspace(start, end, steps, dtype=np.float64)


def quad_betas(steps: int, start: float, end: float) -> np.ndarray:
    return np.linspace(start**0.5, end**0.5, steps, dtype=np.float64) ** 2


def const_betas(steps: int, end: float) -> np.ndarray:
    return np.full(steps, end, dtype=np.float64)


def warmup_betas(steps: int, start: float, end: float, frac: float) -> np.ndarray:
    """Linear from `start` to `end` over the first `frac` of the steps, then constant `end`."""
    betas = np.full(steps, end, dtype=np.float64)
    warmup = int(steps * frac)
    betas[:warmup] = np.linspace(start, end, warmup, dtype=np.float64)
    return betas


def cosine_betas(steps: int, s: float) -> np.ndarray:
    """Nichol & Dhariwal's cosine schedule; betas capped at 0.999 to avoid a singular last step."""
    t = np.arange(steps + 1, dtype=np.float64) / steps
    f = np.cos((t + s) / (1 + s) * np.pi / 2) ** 2
    return np.minimum(1.0 - f[1:] / f[:-1], 0.999)


def respaced_steps(steps: int, n: int) -> np.ndarray:
    """The n kept steps t_1 < ... < t_n = T, spread evenly over 1..T."""
    kept = np.round(np.arange(1, n + 1, dtype=np.float64) * steps / n).astype(np.int64)
    return kept


@dataclasses.dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """A beta schedule with its derived float64 tables. Build with the classmethods."""

    config: ScheduleConfig
    betas: np.ndarray

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", _frozen(self.betas))
        if self.betas.ndim != 1 or not np.all((self.betas > 0) & (self.betas < 1)):
            raise ValueError("NoiseSchedule: betas must be a 1-D array in (0, 1)")

    @classmethod
    def from_config(cls, config: ScheduleConfig) -> "NoiseSchedule":
        if config.kind == "linear":
            betas = linear_betas(config.steps, config.start, config.end)
        elif config.kind == "quad":
            betas = quad_betas(config.steps, config.start, config.end)
        elif config.kind == "const":
            betas = const_betas(config.steps, config.end)
        elif config.kind == "warmup":
            betas = warmup_betas(config.steps, config.start, config.end, config.warmup_frac)
        else:
            betas = cosine_betas(config.steps, config.cosine_s)
        if config.respace is not None:
            gammas = np.cumprod(1.0 - betas)[respaced_steps(config.steps, config.respace) - 1]
            betas = 1.0 - gammas / np.concatenate(([1.0], gammas[:-1]))
        return cls(config, betas)

    @classmethod
    def linear(cls, steps: int, start: float = 1e-6, end: float = 1e-2) -> "NoiseSchedule":
        return cls.from_config(ScheduleConfig("linear", steps, start, end))

    @classmethod
    def quad(cls, steps: int, start: float = 1e-6, end: float = 1e-2) -> "NoiseSchedule":
        return cls.from_config(ScheduleConfig("quad", steps, start, end))

    @classmethod
    def const(cls, steps: int, value: float) -> "NoiseSchedule":
        return cls.from_config(ScheduleConfig("const", steps, value, value))

    @classmethod
    def warmup(cls, steps: int, start: float = 1e-6, end: float = 1e-2, frac: float = 0.1) -> "NoiseSchedule":
        return cls.from_config(ScheduleConfig("warmup", steps, start, end, warmup_frac=frac))

    @classmethod
    def cosine(cls, steps: int, s: float = 8e-3) -> "NoiseSchedule":
        return cls.from_config(ScheduleConfig("cosine", steps, cosine_s=s))

    def respaced(self, n: int) -> "NoiseSchedule":
        """The base schedule's noise levels at n evenly spread steps (gamma at kept steps is
        unchanged). Respacing a respaced schedule respaces its base schedule again."""
        return NoiseSchedule.from_config(dataclasses.replace(self.config, respace=n))

    @property
    def num_steps(self) -> int:
        return int(self.betas.shape[0])

    @functools.cached_property
    def alphas(self) -> np.ndarray:
        return _frozen(1.0 - self.betas)

    @functools.cached_property
    def gammas(self) -> np.ndarray:
        return _frozen(np.cumprod(self.alphas))

    @functools.cached_property
    def gammas_prev(self) -> np.ndarray:
        return _frozen(np.concatenate(([1.0], self.gammas[:-1])))

    @functools.cached_property
    def noise_levels(self) -> np.ndarray:
        """sqrt(gamma_t): what the network is conditioned on by default."""
        return _frozen(np.sqrt(self.gammas))

    @functools.cached_property
    def noise_levels_prev(self) -> np.ndarray:
        return _frozen(np.sqrt(self.gammas_prev))

    @functools.cached_property
    def coef1(self) -> np.ndarray:
        return _frozen(np.sqrt(self.gammas_prev) * self.betas / (1.0 - self.gammas))

    @functools.cached_property
    def coef2(self) -> np.ndarray:
        return _frozen(np.sqrt(self.alphas) * (1.0 - self.gammas_prev) / (1.0 - self.gammas))

    @functools.cached_property
    def posterior_sigma(self) -> np.ndarray:
        return _frozen(np.sqrt((1.0 - self.gammas_prev) * self.betas / (1.0 - self.gammas)))

    @functools.cached_property
    def beta_sigma(self) -> np.ndarray:
        """The paper's sigma_t = sqrt(1 - alpha_t)."""
        return _frozen(np.sqrt(self.betas))

    def table(self, name: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.as_tensor(np.array(getattr(self, name)), dtype=torch.float64).to(device=device, dtype=dtype)

    def __repr__(self) -> str:
        return f"NoiseSchedule({self.config!r}, num_steps={self.num_steps})"
