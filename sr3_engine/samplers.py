"""Reverse-process samplers: ancestral (SR3 eq. 9-11) and DDIM.

Both reduce to the same update, which `ops.posterior_step` runs in one pass:

    y0_hat = y_t / sqrt(gamma_t) - sqrt(1/gamma_t - 1) * eps_hat      (clipped to [-1, 1])
    y_prev = coef1 * y0_hat + coef2 * y_t + sigma * z

Ancestral: coef1, coef2 from the posterior (eq. 4); sigma the posterior sigma or
sqrt(1 - alpha_t); no noise on the last step.
DDIM (Song et al. 2021) with eps re-derived from the clipped y0_hat:
    s = eta sqrt((1 - gamma_prev) / (1 - gamma_t)) sqrt(1 - gamma_t / gamma_prev)
    d = sqrt(1 - gamma_prev - s^2)
    coef1 = sqrt(gamma_prev) - d / sqrt(1/gamma_t - 1),  coef2 = d / (sqrt(gamma_t) sqrt(1/gamma_t - 1)),  sigma = s

A plan holds those per-step scalars in float64, in the order they are applied (t = T
down to 1). Every sampler has the signature of `ancestral`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from . import ops
from .config import SamplerConfig
from .diffusion import randn
from .schedules import NoiseSchedule

StepCallback = Callable[[int, int, torch.Tensor], None]


@dataclasses.dataclass(frozen=True, eq=False)
class SamplingPlan:
    """Per-step scalars of a reverse process, float64, in application order."""

    timesteps: np.ndarray
    noise_level: np.ndarray
    sqrt_recip_gamma: np.ndarray
    sqrt_recipm1_gamma: np.ndarray
    coef1: np.ndarray
    coef2: np.ndarray
    sigma: np.ndarray
    clip: bool
    warm_start: bool = False

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])

    def window(self, start: int, stop: int) -> "SamplingPlan":
        """Steps start..stop-1 of the plan; one that does not begin at the first step starts warm."""
        keep = slice(start, stop)
        return dataclasses.replace(self, warm_start=start > 0, **{
            f.name: getattr(self, f.name)[keep].copy()
            for f in dataclasses.fields(self) if isinstance(getattr(self, f.name), np.ndarray)
        })

    def last(self, n: int) -> "SamplingPlan":
        """The plan's final n steps (the warm start of SamplerConfig.strength)."""
        return self.window(self.num_steps - n, self.num_steps)

    def step_kwargs(self, i: int) -> dict[str, float]:
        return {
            "sqrt_recip_gamma": float(self.sqrt_recip_gamma[i]),
            "sqrt_recipm1_gamma": float(self.sqrt_recipm1_gamma[i]),
            "coef1": float(self.coef1[i]),
            "coef2": float(self.coef2[i]),
            "sigma": float(self.sigma[i]),
        }


def ancestral_plan(schedule: NoiseSchedule, config: SamplerConfig) -> SamplingPlan:
    sigma = schedule.posterior_sigma if config.sigma == "posterior" else schedule.beta_sigma
    sigma = sigma.copy()
    sigma[0] = 0.0
    return _reversed_plan(schedule, schedule.coef1, schedule.coef2, sigma, config.clip)


def ddim_plan(schedule: NoiseSchedule, config: SamplerConfig) -> SamplingPlan:
    gamma, gamma_prev = schedule.gammas, schedule.gammas_prev
    s = config.eta * np.sqrt((1.0 - gamma_prev) / (1.0 - gamma)) * np.sqrt(1.0 - gamma / gamma_prev)
    d = np.sqrt(np.maximum(1.0 - gamma_prev - s * s, 0.0))
    coef1 = np.sqrt(gamma_prev) - d / schedule.sqrt_recipm1_gamma
    coef2 = d * schedule.sqrt_recip_gamma / schedule.sqrt_recipm1_gamma
    return _reversed_plan(schedule, coef1, coef2, s, config.clip)


def _reversed_plan(schedule: NoiseSchedule, coef1, coef2, sigma, clip: bool) -> SamplingPlan:
    order = slice(None, None, -1)
    return SamplingPlan(
        timesteps=np.arange(schedule.num_steps, 0, -1),
        noise_level=schedule.noise_levels[order].copy(),
        sqrt_recip_gamma=schedule.sqrt_recip_gamma[order].copy(),
        sqrt_recipm1_gamma=schedule.sqrt_recipm1_gamma[order].copy(),
        coef1=np.asarray(coef1, dtype=np.float64)[order].copy(),
        coef2=np.asarray(coef2, dtype=np.float64)[order].copy(),
        sigma=np.asarray(sigma, dtype=np.float64)[order].copy(),
        clip=clip,
    )


PLANNERS: dict[str, Callable[[NoiseSchedule, SamplerConfig], SamplingPlan]] = {
    "ancestral": ancestral_plan,
    "ddim": ddim_plan,
}


def make_plan(schedule: NoiseSchedule, config: SamplerConfig) -> SamplingPlan:
    plan = PLANNERS[config.name](schedule, config)
    if config.strength < 1.0:
        plan = plan.last(max(1, round(config.strength * plan.num_steps)))
    return plan


def initial_state(plan: SamplingPlan, x_up: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """y at the plan's first step: pure noise when the plan runs the whole schedule (SR3
    treats gamma_T as 0), else x_up diffused to the first step's level by q(y_t | y_0)."""
    if not plan.warm_start:
        return noise
    level = float(plan.noise_level[0])
    return level * x_up.float() + (1.0 - level * level) ** 0.5 * noise


def run_plan(model: nn.Module, x_up: torch.Tensor, y_T: torch.Tensor, plan: SamplingPlan, *,
             generator: torch.Generator | None = None, callback: StepCallback | None = None,
             backend: str = "auto") -> torch.Tensor:
    """Apply `plan` from y_T. The state stays float32 whatever the model's dtype, so rounding
    does not accumulate over the steps. Raises FloatingPointError naming the first step that
    produced NaN or Inf (checked once at the end, so there is no per-step sync)."""
    # A copy even when y_T is float32 already: under inference_mode every step's y is then an
    # inference tensor, so a compiled model sees one kind of input and does not recompile after step 1.
    y = y_T.to(torch.float32, copy=True)
    batch = y.shape[0]
    nonfinite = torch.zeros(plan.num_steps, dtype=torch.bool, device=y.device)
    for i in range(plan.num_steps):
        level = torch.full((batch,), float(plan.noise_level[i]), device=y.device, dtype=torch.float32)
        eps = model(x_up, y.to(x_up.dtype), level)
        step = plan.step_kwargs(i)
        noise = randn(tuple(y.shape), generator, y.device) if step["sigma"] != 0.0 else None
        y = ops.posterior_step(y, eps, noise=noise, clip=plan.clip, backend=backend, **step)
        nonfinite[i] = ~torch.isfinite(y).all()
        if callback is not None:
            callback(i, plan.num_steps, y)
    raise_if_nonfinite(nonfinite, plan)
    return y


def raise_if_nonfinite(nonfinite: torch.Tensor, plan: SamplingPlan) -> None:
    """Raise FloatingPointError naming the first step whose flag in `nonfinite` is set."""
    if bool(nonfinite.any()):
        first = int(nonfinite.nonzero()[0])
        raise FloatingPointError(
            f"sampling produced NaN/Inf at step {first + 1} of {plan.num_steps} "
            f"(t={int(plan.timesteps[first])}, noise level {plan.noise_level[first]:.4g}); "
            "the model's output is not finite there: check the weights, or sample in float32"
        )


def ancestral(model: nn.Module, x_up: torch.Tensor, y_T: torch.Tensor, schedule: NoiseSchedule, *,
              config: SamplerConfig = SamplerConfig("ancestral"), generator: torch.Generator | None = None,
              callback: StepCallback | None = None, backend: str = "auto") -> torch.Tensor:
    """SR3's ancestral sampler (eq. 9-11)."""
    return run_plan(model, x_up, y_T, ancestral_plan(schedule, config), generator=generator,
                    callback=callback, backend=backend)


def ddim(model: nn.Module, x_up: torch.Tensor, y_T: torch.Tensor, schedule: NoiseSchedule, *,
         config: SamplerConfig = SamplerConfig("ddim"), generator: torch.Generator | None = None,
         callback: StepCallback | None = None, backend: str = "auto") -> torch.Tensor:
    """DDIM; deterministic with config.eta = 0."""
    return run_plan(model, x_up, y_T, ddim_plan(schedule, config), generator=generator,
                    callback=callback, backend=backend)


SAMPLERS = {"ancestral": ancestral, "ddim": ddim}
