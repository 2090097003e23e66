"""Reverse-process samplers: ancestral (SR3 eq. 9-11), DDIM and DPM-Solver++(2M), and the one
sampling loop.

Every sampler reduces to the same update, which `ops.posterior_step` runs in one pass:

    y0_hat = state_coef * y_t - output_coef * f                      (clipped to [-1, 1])
    y_prev = coef1 * y0_hat + coef2 * y_t + sigma * z

f is the network's output and (state_coef, output_coef) = `diffusion.y0_coefficients` of the
model's prediction target at the step's level, so eps, y0 and v models take the same path.
Ancestral: coef1, coef2 from the posterior (eq. 4); sigma the posterior sigma or
sqrt(1 - alpha_t); no noise on the last step.
DDIM (Song et al. 2021) with eps re-derived from the clipped y0_hat:
    s = eta sqrt((1 - gamma_prev) / (1 - gamma_t)) sqrt(1 - gamma_t / gamma_prev)
    d = sqrt(1 - gamma_prev - s^2)
    coef1 = sqrt(gamma_prev) - d / sqrt(1/gamma_t - 1),  coef2 = d / sqrt(1 - gamma_t),  sigma = s
DPM-Solver++(2M) (Lu et al. 2022, alg. 2) in lambda = log(sqrt(gamma) / sqrt(1 - gamma)) of the
levels the network sees, h = lambda_prev - lambda_t, r = h of the step before / h:
    D = y0_hat + (y0_hat - y0_hat of the step before) / (2 r)     (D = y0_hat on the first step
                                                                   and on the last, to gamma = 1)
    coef1 = sqrt(gamma_prev) (1 - e^-h),  coef2 = sqrt(1 - gamma_prev) / sqrt(1 - gamma_t),  sigma = 0
with D in place of y0_hat. "mean" is one step from the schedule's noisiest level straight to
y0_hat (coef1 = 1, coef2 = sigma = 0): the network's estimate of E[y0 | x], the highest-PSNR
output a v or y0 model gives (an eps model's is noise: 1/sqrt(gamma) amplifies its error).
A multistep plan (`SamplingPlan.extrapolation` not all 0) carries the
previous y0_hat; its step is two calls of the same op: f -> y0_hat, then D -> y_prev.

A sampler is a planner: a small function (schedule, config) -> SamplingPlan, registered
in `SAMPLERS`, the one list of sampler names. A plan holds the per-step scalars in
float64, in the order they are applied (t = T down to 1). `sample` is the public entry
point and `SR3Engine.sample` takes the same path (`sample_with`: `start_sampling`, a run,
`finish_sampling`); every loop that runs a plan (the eager one here, the fused backend's
captured one) is `run_steps`, and every step of it is `posterior_update`, which the serving
scheduler also applies to each request, step by step, between batched denoiser calls.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Protocol, Sequence

import numpy as np
import torch
import torch.nn as nn

from . import ops
from .config import PREDICTIONS, JsonConfig
from .diffusion import (from_diffused, model_prediction, model_residual_scale, q_sample, randn, to_diffused,
                        y0_coefficients)
from .schedules import NoiseSchedule

SIGMA_KINDS = ("posterior", "beta")

StepCallback = Callable[[int, int, torch.Tensor], None]
Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclasses.dataclass(frozen=True)
class SamplerConfig(JsonConfig):
    """How the reverse process is run.

    `name` is a key of `SAMPLERS`: ancestral, ddim, dpmpp_2m or mean. `sigma="posterior"` uses
    the posterior standard deviation of eq. 4, `"beta"` the paper's sqrt(1 - alpha_t) (ancestral
    only). `eta` only applies to DDIM (0 = deterministic).

    `strength` is the fraction of the schedule that is run. At 1 the reverse process starts
    from pure noise (SR3). Below 1 it starts from the condition diffused to the noise level
    of the first step run, q(y_t | y_0 = x_up) = sqrt(gamma) x_up + sqrt(1 - gamma) z, and runs
    only the remaining steps (the warm start of Chung et al. 2022, "Come-Closer-Diffuse-
    Faster"): fewer steps, and the low frequencies come from the input.
    """

    name: str = "ancestral"
    clip: bool = True
    sigma: str = "posterior"
    eta: float = 0.0
    strength: float = 1.0

    def __post_init__(self) -> None:
        self.check_field_types()
        if self.name not in SAMPLERS:
            raise ValueError(f"SamplerConfig.name must be one of {tuple(SAMPLERS)}; got {self.name!r}")
        if self.sigma not in SIGMA_KINDS:
            raise ValueError(f"SamplerConfig.sigma must be one of {SIGMA_KINDS}; got {self.sigma!r}")
        if not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"SamplerConfig.eta must be in [0, 1]; got {self.eta}")
        if not 0.0 < self.strength <= 1.0:
            raise ValueError(f"SamplerConfig.strength must be in (0, 1]; got {self.strength}")


@dataclasses.dataclass(frozen=True, eq=False)
class SamplingPlan:
    """Per-step scalars of a reverse process, float64, in application order.

    `prediction` is the network's target; `state_coef` and `output_coef` follow from it and
    `noise_level`. `extrapolation` is the weight of the previous y0_hat (1 / 2r of DPM-Solver++
    (2M)), 0 for single-step samplers.
    """

    timesteps: np.ndarray
    noise_level: np.ndarray
    coef1: np.ndarray
    coef2: np.ndarray
    sigma: np.ndarray
    extrapolation: np.ndarray
    clip: bool
    prediction: str = "eps"
    warm_start: bool = False

    def __post_init__(self) -> None:
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"SamplingPlan.prediction must be one of {PREDICTIONS}; got {self.prediction!r}")

    @functools.cached_property
    def _y0_coefficients(self) -> tuple[np.ndarray, np.ndarray]:
        return y0_coefficients(self.prediction, self.noise_level)

    @property
    def state_coef(self) -> np.ndarray:
        return self._y0_coefficients[0]

    @property
    def output_coef(self) -> np.ndarray:
        return self._y0_coefficients[1]

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])

    @property
    def multistep(self) -> bool:
        return bool(np.any(self.extrapolation != 0.0))

    def window(self, start: int, stop: int) -> "SamplingPlan":
        """Steps start..stop-1 of the plan; one that does not begin at the first step starts warm,
        with no previous y0_hat to extrapolate from."""
        keep = slice(start, stop)
        arrays = {f.name: getattr(self, f.name)[keep].copy()
                  for f in dataclasses.fields(self) if isinstance(getattr(self, f.name), np.ndarray)}
        arrays["extrapolation"][:1] = 0.0
        return dataclasses.replace(self, warm_start=start > 0, **arrays)

    def last(self, n: int) -> "SamplingPlan":
        """The plan's final n steps (the warm start of SamplerConfig.strength)."""
        return self.window(self.num_steps - n, self.num_steps)

    def step_kwargs(self, i: int) -> dict[str, float]:
        return {
            "state_coef": float(self.state_coef[i]),
            "output_coef": float(self.output_coef[i]),
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
    coef1 = np.sqrt(gamma_prev) - d / np.sqrt(1.0 / gamma - 1.0)
    coef2 = d / np.sqrt(1.0 - gamma)
    return _reversed_plan(schedule, coef1, coef2, s, config.clip)


def dpmpp_2m_plan(schedule: NoiseSchedule, config: SamplerConfig) -> SamplingPlan:
    """Deterministic: `eta` and `sigma` do not apply."""
    gamma, gamma_prev = schedule.gammas, schedule.gammas_prev
    lam = 0.5 * np.log(gamma / (1.0 - gamma))
    with np.errstate(divide="ignore"):
        lam_prev = 0.5 * np.log(gamma_prev / (1.0 - gamma_prev))
    h = lam_prev - lam
    coef1 = np.sqrt(gamma_prev) * -np.expm1(-h)
    coef2 = np.sqrt(1.0 - gamma_prev) / np.sqrt(1.0 - gamma)
    # In table order (t = 1..T) the step applied before t's is t + 1's.
    extrapolation = np.zeros_like(h)
    to_noise_free = gamma_prev >= 1.0
    usable = ~to_noise_free[:-1]
    extrapolation[:-1][usable] = h[:-1][usable] / (2.0 * h[1:][usable])
    return _reversed_plan(schedule, coef1, coef2, np.zeros_like(h), config.clip, extrapolation)


def mean_plan(schedule: NoiseSchedule, config: SamplerConfig) -> SamplingPlan:
    """One network evaluation at gamma_T, returning its y0_hat; `strength`, `eta` and `sigma` do not apply."""
    last = slice(schedule.num_steps - 1, schedule.num_steps)
    return SamplingPlan(
        timesteps=np.array([schedule.num_steps]),
        noise_level=schedule.noise_levels[last].copy(),
        coef1=np.ones(1), coef2=np.zeros(1), sigma=np.zeros(1), extrapolation=np.zeros(1),
        clip=config.clip,
    )


def _reversed_plan(schedule: NoiseSchedule, coef1, coef2, sigma, clip: bool,
                   extrapolation: np.ndarray | None = None) -> SamplingPlan:
    order = slice(None, None, -1)
    if extrapolation is None:
        extrapolation = np.zeros(schedule.num_steps)
    return SamplingPlan(
        timesteps=np.arange(schedule.num_steps, 0, -1),
        noise_level=schedule.noise_levels[order].copy(),
        coef1=np.asarray(coef1, dtype=np.float64)[order].copy(),
        coef2=np.asarray(coef2, dtype=np.float64)[order].copy(),
        sigma=np.asarray(sigma, dtype=np.float64)[order].copy(),
        extrapolation=np.asarray(extrapolation, dtype=np.float64)[order].copy(),
        clip=clip,
    )


Planner = Callable[[NoiseSchedule, SamplerConfig], SamplingPlan]

# The one registry of samplers: SamplerConfig, the commands and the engine take names from it.
SAMPLERS: dict[str, Planner] = {
    "ancestral": ancestral_plan,
    "ddim": ddim_plan,
    "dpmpp_2m": dpmpp_2m_plan,
    "mean": mean_plan,
}


def make_plan(schedule: NoiseSchedule, config: SamplerConfig, prediction: str = "eps") -> SamplingPlan:
    """The plan of `config` over `schedule` for a network predicting `prediction`, cut to its
    last steps when config.strength < 1."""
    plan = dataclasses.replace(SAMPLERS[config.name](schedule, config), prediction=prediction)
    if config.strength < 1.0:
        plan = plan.last(max(1, round(config.strength * plan.num_steps)))
    return plan


def model_plan(schedule: NoiseSchedule, config: SamplerConfig, prediction: str = "eps",
               residual_scale: float | None = None) -> SamplingPlan:
    """`make_plan` for a model of that target and diffused space: a residual model's y0_hat is
    not clipped, since the image's bounds are no fixed interval there."""
    plan = make_plan(schedule, config, prediction)
    return dataclasses.replace(plan, clip=False) if residual_scale is not None else plan


def initial_state(plan: SamplingPlan, start: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """y at the plan's first step, float32: pure noise when the plan runs the whole schedule
    (SR3 treats gamma_T as 0), else `start` (the condition in the diffused space) diffused to
    the first step's level by q(y_t | y_0)."""
    if not plan.warm_start:
        return noise.float()
    level = torch.full((start.shape[0],), float(plan.noise_level[0]), device=start.device, dtype=torch.float32)
    return q_sample(start.float(), level, noise.float())


def level_tensors(plan: SamplingPlan, batch: int, device: torch.device | str) -> list[torch.Tensor]:
    """The noise level fed to the network at each step, one (batch,) float32 tensor per step."""
    return [torch.full((batch,), float(level), device=device, dtype=torch.float32) for level in plan.noise_level]


class NoiseSource(Protocol):
    def for_step(self, step: int, like: torch.Tensor) -> dict: ...


@dataclasses.dataclass(frozen=True)
class GeneratorNoise:
    """Each step's z drawn from `generator` on its own device (the eager backends' noise)."""

    generator: torch.Generator | None

    def for_step(self, step: int, like: torch.Tensor) -> dict:
        return {"noise": randn(tuple(like.shape), self.generator, like.device)}


@dataclasses.dataclass(frozen=True)
class GivenNoise:
    """Each step's z read from a buffer of shape (steps, *y.shape), filled by the caller."""

    buffer: torch.Tensor

    def for_step(self, step: int, like: torch.Tensor) -> dict:
        return {"noise": self.buffer[step]}


@dataclasses.dataclass(frozen=True)
class SeededNoise:
    """Each step's z drawn inside the posterior kernel from (seed, step); `seed` is an int or a
    0-d int64 tensor on the state's device (see `ops.dispatch`)."""

    seed: int | torch.Tensor

    def for_step(self, step: int, like: torch.Tensor) -> dict:
        return {"seed": self.seed, "step": step}


def posterior_update(plan: SamplingPlan, i: int, y: torch.Tensor, output: torch.Tensor, *, noise: NoiseSource,
                     nonfinite: torch.Tensor, history: torch.Tensor | None = None,
                     backend: str = "auto") -> torch.Tensor:
    """Step i of `plan` from state y given the network's output: y_prev, and nonfinite[i] set
    when y_prev holds NaN or Inf (a device-side flag, so no step waits for the host). A
    multistep plan needs `history`, a buffer like y that carries y0_hat from step to step."""
    step = plan.step_kwargs(i)
    noise_kwargs = noise.for_step(i, y) if step["sigma"] != 0.0 else {}
    if plan.multistep:
        if history is None:
            raise ValueError("posterior_update: a multistep plan needs a history buffer")
        y0_hat = ops.posterior_step(y, output, state_coef=step["state_coef"], output_coef=step["output_coef"],
                                    coef1=1.0, coef2=0.0, sigma=0.0, clip=plan.clip, backend=backend)
        weight = float(plan.extrapolation[i])
        # (1 + w) y0_hat - w previous: the previous one is only read when it exists (w != 0).
        output = torch.lerp(history, y0_hat, 1.0 + weight) if weight != 0.0 else y0_hat
        history.copy_(y0_hat)
        step.update(state_coef=0.0, output_coef=-1.0)
        y = ops.posterior_step(y, output, clip=False, backend=backend, **noise_kwargs, **step)
    else:
        y = ops.posterior_step(y, output, clip=plan.clip, backend=backend, **noise_kwargs, **step)
    nonfinite[i] = ~torch.isfinite(y).all()
    return y


def run_steps(denoise: Denoiser, x_up: torch.Tensor, y_T: torch.Tensor, plan: SamplingPlan, *,
              noise: NoiseSource, nonfinite: torch.Tensor, levels: Sequence[torch.Tensor] | None = None,
              steps: Sequence[int] | None = None, callback: StepCallback | None = None,
              backend: str = "auto") -> torch.Tensor:
    """Apply `steps` (default: all) of `plan` from y_T. The state stays float32 whatever the
    model's dtype, so rounding does not accumulate over the steps; the network sees it in
    x_up's dtype. `levels` (default: `level_tensors`) are the per-step network inputs, for a
    caller that must own them (a captured graph reads them on every replay)."""
    # A copy even when y_T is float32 already: under inference_mode every step's y is then an
    # inference tensor, so a compiled model sees one kind of input and does not recompile after step 1.
    y = y_T.to(torch.float32, copy=True)
    if levels is None:
        levels = level_tensors(plan, y.shape[0], y.device)
    history = torch.zeros_like(y) if plan.multistep else None
    for i in range(plan.num_steps) if steps is None else steps:
        output = denoise(x_up, y.to(x_up.dtype), levels[i])
        y = posterior_update(plan, i, y, output, noise=noise, nonfinite=nonfinite, history=history, backend=backend)
        if callback is not None:
            callback(i, plan.num_steps, y)
    return y


def run_plan(denoise: Denoiser, x_up: torch.Tensor, y_T: torch.Tensor, plan: SamplingPlan, *,
             generator: torch.Generator | None = None, callback: StepCallback | None = None,
             backend: str = "auto") -> torch.Tensor:
    """The whole plan from y_T with noise from `generator`. Raises FloatingPointError naming the
    first step that produced NaN or Inf (checked once at the end, so there is no per-step sync)."""
    nonfinite = torch.zeros(plan.num_steps, dtype=torch.bool, device=y_T.device)
    y = run_steps(denoise, x_up, y_T, plan, noise=GeneratorNoise(generator), nonfinite=nonfinite,
                  callback=callback, backend=backend)
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


class PlanRunner(Protocol):
    """Runs a whole plan from y_T: `run_plan` around a denoiser, or an engine backend's `run`."""

    def __call__(self, x_up: torch.Tensor, y_T: torch.Tensor, plan: SamplingPlan, *,
                 generator: torch.Generator | None, callback: StepCallback | None) -> torch.Tensor: ...


def start_sampling(x_up: torch.Tensor, schedule: NoiseSchedule, config: SamplerConfig, *,
                   prediction: str = "eps", residual_scale: float | None = None,
                   generator: torch.Generator | None = None) -> tuple[SamplingPlan, torch.Tensor]:
    """The plan of `config` over `schedule` for a `prediction` network and the initial state
    for condition x_up, drawn from `generator` (pure noise, or the diffused condition when
    config.strength < 1): what any runner of the reverse process starts from.

    For a residual model (`residual_scale`, see `diffusion.to_diffused`) the plan runs on the
    scaled residual, unclipped (`model_plan`; `finish_sampling` clamps the image instead)."""
    plan = model_plan(schedule, config, prediction, residual_scale)
    start = to_diffused(x_up, x_up, residual_scale)
    return plan, initial_state(plan, start, randn(tuple(x_up.shape), generator, x_up.device))


def finish_sampling(d0: torch.Tensor, x_up: torch.Tensor, residual_scale: float | None) -> torch.Tensor:
    """The image y0 in [-1, 1] of the reverse process's last state d0 (in the diffused space)."""
    if residual_scale is None:
        return d0
    return from_diffused(d0, x_up.float(), residual_scale).clamp(-1.0, 1.0)


def sample_with(run: PlanRunner, x_up: torch.Tensor, schedule: NoiseSchedule, config: SamplerConfig, *,
                prediction: str = "eps", residual_scale: float | None = None,
                generator: torch.Generator | None = None, callback: StepCallback | None = None) -> torch.Tensor:
    """`start_sampling`, then `run` applies the plan, then `finish_sampling`: the image y0."""
    plan, y_T = start_sampling(x_up, schedule, config, prediction=prediction, residual_scale=residual_scale,
                               generator=generator)
    return finish_sampling(run(x_up, y_T, plan, generator=generator, callback=callback), x_up, residual_scale)


def sample(model: nn.Module | Denoiser, x_up: torch.Tensor, schedule: NoiseSchedule,
           config: SamplerConfig = SamplerConfig(), *, prediction: str | None = None,
           generator: torch.Generator | None = None, callback: StepCallback | None = None,
           backend: str = "auto") -> torch.Tensor:
    """SR3 sampling with any denoiser model(x_up, y_t, noise_level) -> output: condition x_up
    (B, C, H, W) in [-1, 1] -> y_0 (B, C, H, W) in [-1, 1], float32. Honours the whole
    `config` (sampler, sigma, eta, clip, strength); the same generator seed gives the same
    output. `prediction` (what the output estimates) defaults to the model's
    `config.prediction`, or eps for a denoiser without one; what is diffused is the model's
    (`diffusion.model_residual_scale`). `backend` is the op backend of the posterior step."""
    if prediction is None:
        prediction = model_prediction(model)
    return sample_with(functools.partial(run_plan, model, backend=backend), x_up, schedule, config,
                       prediction=prediction, residual_scale=model_residual_scale(model),
                       generator=generator, callback=callback)
