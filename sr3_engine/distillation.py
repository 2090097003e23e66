"""Progressive distillation (Salimans and Ho 2022, "Progressive Distillation for Fast Sampling of
Diffusion Models", alg. 2): a student that does in one deterministic step what its teacher's
deterministic sampler does in two.

The teacher's sampler is DDIM with eta = 0 over its schedule respaced to 2N steps; the
student's, DDIM over the same schedule respaced to N, whose levels are every other level of
the teacher's (`distillation_plans` checks it), so student step i, from level t to t'', spans
teacher steps 2i (t to t') and 2i + 1 (t' to t''). Both run in the model's own prediction target
and diffused space (the image, or the scaled residual: `diffusion.to_diffused`) through the plan's
coefficients, as every sampler does. With alpha = sqrt(gamma) and sigma = sqrt(1 - gamma), one
DDIM step from state z_t with y0 estimate x is

    z_s = alpha_s x + sigma_s (z_t - alpha_t x) / sigma_t = coef1 x + coef2 z_t,

so the y0 estimate that takes the student from z_t to the teacher's z_t'' in one step is the
paper's

    x~ = (z_t'' - (sigma_t'' / sigma_t) z_t) / (alpha_t'' - (sigma_t'' / sigma_t) alpha_t)
       = (z_t'' - coef2 z_t) / coef1                (z_t'' itself on the last step, to gamma = 1),

and the student's target output is the one whose y0 estimate under the plan's coefficients
(state_coef z_t - output_coef f, `diffusion.y0_coefficients`) is x~: x~ itself for y0,
(z_t - alpha_t x~) / sigma_t for eps, (alpha_t z_t - x~) / sigma_t for v. The loss is the
training loss on that target (`diffusion.prediction_loss`); for v with L2 it is the paper's
"SNR + 1" weighting of the y0 error.

Training states: the student step i is uniform over its N steps and z_t = q(z_t | d0) at its
level, except on the first step, whose state is pure noise as when sampling (SR3 treats gamma_T
as 0; the paper's schedules end at SNR 0, where the two agree): the student learns the teacher's
map from the states it will be given.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn as nn

from .diffusion import generator_device, model_residual_scale, prediction_loss, q_sample, randn, to_diffused
from .samplers import Denoiser, GeneratorNoise, SamplerConfig, SamplingPlan, model_plan, posterior_update
from .schedules import NoiseSchedule


def student_sampler(clip: bool = True) -> SamplerConfig:
    """The deterministic sampler that teacher and student run: DDIM, eta = 0."""
    return SamplerConfig(name="ddim", clip=clip, eta=0.0)


@dataclasses.dataclass(frozen=True, eq=False)
class DistillationPlans:
    """The teacher's 2N-step plan and the student's N-step plan over the same levels."""

    teacher: SamplingPlan
    student: SamplingPlan


def distillation_plans(schedule: NoiseSchedule, steps: int, prediction: str, residual_scale: float | None,
                       clip: bool = True) -> DistillationPlans:
    """The plans of one round that distils 2 x `steps` teacher steps into `steps` student steps
    over `schedule`'s levels (respaced to each)."""
    if steps < 1 or 2 * steps > schedule.config.steps:
        raise ValueError(f"distillation into {steps} steps needs a schedule of at least {2 * steps} steps; "
                         f"{schedule.config.kind} has {schedule.config.steps}")
    sampler = student_sampler(clip)
    # Respacing keeps steps round(j T / n) of the base schedule's T, and step 2j of 2n is the same
    # number, so the student's levels are every other teacher level whatever T and n.
    return DistillationPlans(teacher=model_plan(schedule.respaced(2 * steps), sampler, prediction, residual_scale),
                             student=model_plan(schedule.respaced(steps), sampler, prediction, residual_scale))


def _per_sample(values: np.ndarray, steps: torch.Tensor) -> torch.Tensor:
    """values[steps[b]] for each sample b, float64, shaped to broadcast over (B, C, H, W)."""
    return torch.as_tensor(values, dtype=torch.float64, device=steps.device)[steps].view(-1, 1, 1, 1)


def step_each(plan: SamplingPlan, steps: torch.Tensor, y: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """Sample b of state y advanced by step steps[b] of `plan` given the network's output
    (`posterior_update`, the one sampling step, applied to the samples at each step)."""
    advanced = torch.empty_like(y, dtype=torch.float32)
    nonfinite = torch.zeros(plan.num_steps, dtype=torch.bool, device=y.device)
    for i in torch.unique(steps).tolist():
        rows = (steps == i).nonzero().squeeze(1)
        advanced[rows] = posterior_update(plan, i, y[rows].float(), output[rows].float(), noise=GeneratorNoise(None),
                                          nonfinite=nonfinite)
    return advanced


def teacher_two_steps(teacher: Denoiser, x_up: torch.Tensor, z: torch.Tensor, steps: torch.Tensor,
                      plans: DistillationPlans) -> torch.Tensor:
    """z_t'': sample b of state z taken through teacher steps 2 steps[b] and 2 steps[b] + 1."""
    z_next = z
    for first in (2 * steps, 2 * steps + 1):
        levels = _per_sample(plans.teacher.noise_level, first).view(-1).float()
        z_next = step_each(plans.teacher, first, z_next, teacher(x_up, z_next.to(x_up.dtype), levels))
    return z_next


def student_target(plans: DistillationPlans, steps: torch.Tensor, z: torch.Tensor,
                   z_teacher: torch.Tensor) -> torch.Tensor:
    """The output the student should give at state z on its step steps[b] for one DDIM step of
    its plan to land on z_teacher (the module docstring's x~, in the model's target), float32."""
    student, z = plans.student, z.double()
    x = (z_teacher.double() - _per_sample(student.coef2, steps) * z) / _per_sample(student.coef1, steps)
    return ((_per_sample(student.state_coef, steps) * z - x) / _per_sample(student.output_coef, steps)).float()


def distillation_loss(student: nn.Module, x_up: torch.Tensor, y0: torch.Tensor, *, teacher: Denoiser,
                      plans: DistillationPlans, p: int = 2, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mean |student output - target|^p at one random student step per sample (the module
    docstring); the teacher runs without gradients."""
    if p not in (1, 2):
        raise ValueError(f"distillation_loss: p must be 1 or 2; got {p!r}")
    batch, device = y0.shape[0], y0.device
    d0 = to_diffused(y0, x_up, model_residual_scale(student)).float()
    steps = torch.randint(0, plans.student.num_steps, (batch,), generator=generator,
                          device=generator_device(generator)).to(device)
    levels = _per_sample(plans.student.noise_level, steps).view(-1).float()
    noise = randn(tuple(y0.shape), generator, device)
    first = (steps == 0).view(-1, 1, 1, 1)
    z = torch.where(first, noise, q_sample(d0, levels, noise))
    with torch.no_grad():
        target = student_target(plans, steps, z, teacher_two_steps(teacher, x_up, z, steps, plans))
    return prediction_loss(student(x_up, z.to(x_up.dtype), levels), target, p)
