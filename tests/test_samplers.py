"""Samplers: an oracle denoiser must lead every sampler back to y0 whatever the network predicts;
plans follow the equations."""

import dataclasses

import numpy as np
import pytest
import torch

import sr3_engine as sr3
from sr3_engine.samplers import ancestral_plan, ddim_plan, dpmpp_2m_plan, initial_state, run_plan

from .conftest import oracle_denoiser

SCHEDULES = {
    "linear100": lambda: sr3.NoiseSchedule.linear(100, 1e-4, 0.1),
    "cosine50": lambda: sr3.NoiseSchedule.cosine(50),
    "train2000_respaced25": lambda: sr3.NoiseSchedule.linear(2000, 1e-6, 1e-2).respaced(25),
    "warmup40": lambda: sr3.NoiseSchedule.warmup(40, 1e-4, 0.05, 0.3),
}
CONFIGS = {
    "ancestral_posterior": sr3.SamplerConfig("ancestral"),
    "ancestral_beta": sr3.SamplerConfig("ancestral", sigma="beta"),
    "ancestral_noclip": sr3.SamplerConfig("ancestral", clip=False),
    "ddim": sr3.SamplerConfig("ddim"),
    "ddim_eta05": sr3.SamplerConfig("ddim", eta=0.5),
    "dpmpp_2m": sr3.SamplerConfig("dpmpp_2m"),
    "dpmpp_2m_noclip": sr3.SamplerConfig("dpmpp_2m", clip=False),
    "mean": sr3.SamplerConfig("mean"),
}


@pytest.mark.parametrize("prediction", ["eps", "y0", "v"])
@pytest.mark.parametrize("schedule_name", SCHEDULES)
@pytest.mark.parametrize("config_name", CONFIGS)
def test_oracle_denoiser_recovers_y0(schedule_name, config_name, prediction):
    config = CONFIGS[config_name]
    g = torch.Generator().manual_seed(5)
    y0 = torch.rand(2, 3, 9, 7, generator=g) * 1.8 - 0.9
    out = sr3.sample(oracle_denoiser(y0, prediction=prediction), torch.zeros_like(y0), SCHEDULES[schedule_name](),
                     config, prediction=prediction, generator=torch.Generator().manual_seed(1))
    assert (out - y0).abs().max().item() < 1e-3


class ResidualOracle:
    """The oracle of a model that diffuses s (y0 - x_up): it knows that residual, and its config
    says what it predicts and diffuses, as an SR3UNet's does."""

    def __init__(self, y0: torch.Tensor, x_up: torch.Tensor, prediction: str, residual_scale: float):
        self.config = dataclasses.replace(sr3.UNetConfig.named("tiny"), prediction=prediction,
                                          residual_scale=residual_scale)
        self._oracle = oracle_denoiser(sr3.to_diffused(y0, x_up, residual_scale), prediction=prediction)

    def __call__(self, x_up, y_t, noise_level):
        return self._oracle(x_up, y_t, noise_level)


@pytest.mark.parametrize("prediction", ["eps", "y0", "v"])
@pytest.mark.parametrize("config_name", CONFIGS)
@pytest.mark.parametrize("strength", [1.0, 0.3])
def test_oracle_of_a_residual_model_recovers_y0(config_name, prediction, strength):
    # x_up + d0 / s must come out, from pure noise and from the warm start (whose start is the
    # condition's own residual: zero); y0 lies up to 1.8 from the condition, beyond the [-1, 1]
    # that a clip of the scaled residual would impose, so the plan must not clip it.
    config = dataclasses.replace(CONFIGS[config_name], strength=strength)
    g = torch.Generator().manual_seed(5)
    y0 = torch.rand(2, 3, 9, 7, generator=g) * 1.8 - 0.9
    x_up = (y0 + 0.3 * torch.randn(y0.shape, generator=g)).clamp(-1, 1)
    x_up[0, 0, 0, 0], y0[0, 0, 0, 0] = -0.9, 0.9
    oracle = ResidualOracle(y0, x_up, prediction, 4.0)
    out = sr3.sample(oracle, x_up, SCHEDULES["linear100"](), config, generator=torch.Generator().manual_seed(1))
    assert (out - y0).abs().max().item() < 1e-3
    image_model = sr3.sample(oracle._oracle, x_up, SCHEDULES["linear100"](), config, prediction=prediction,
                             generator=torch.Generator().manual_seed(1))
    assert (image_model - y0).abs().max().item() > 0.1


@pytest.mark.parametrize("truth, assumed", [("y0", "eps"), ("v", "y0")])
def test_an_oracle_read_as_another_target_does_not_recover_y0(truth, assumed):
    # The converse of the oracle test: the prediction decides the y0 coefficients, so reading
    # one target as another goes wrong (the oracle test could not fail otherwise).
    g = torch.Generator().manual_seed(5)
    y0 = torch.rand(1, 3, 6, 6, generator=g) * 1.8 - 0.9
    out = sr3.sample(oracle_denoiser(y0, prediction=truth), torch.zeros_like(y0), SCHEDULES["linear100"](),
                     sr3.SamplerConfig("ddim"), prediction=assumed, generator=torch.Generator().manual_seed(1))
    assert (out - y0).abs().max().item() > 0.1


def test_every_registered_sampler_is_a_planner_of_the_schedule():
    schedule = sr3.NoiseSchedule.linear(12, 1e-3, 0.2)
    for name, planner in sr3.SAMPLERS.items():
        plan = planner(schedule, sr3.SamplerConfig(name))
        expected = np.array([12]) if name == "mean" else np.arange(12, 0, -1)
        assert np.array_equal(plan.timesteps, expected), name
    with pytest.raises(ValueError, match="must be one of \\('ancestral', 'ddim', 'dpmpp_2m', 'mean'\\)"):
        sr3.SamplerConfig("euler")


@pytest.mark.parametrize("prediction", ["eps", "y0", "v"])
def test_the_mean_is_the_networks_y0_estimate_at_the_noisiest_level(prediction):
    schedule = sr3.NoiseSchedule.linear(20, 1e-4, 0.2)
    seen = []

    def network(x_up, y_t, level):
        seen.append(float(level[0]))
        return torch.full_like(y_t, 0.3)

    y_T = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    plan = sr3.make_plan(schedule, sr3.SamplerConfig("mean", clip=False), prediction)
    out = run_plan(network, torch.zeros_like(y_T), y_T, plan)
    g = float(schedule.gammas[-1])
    expected = {"eps": y_T / np.sqrt(g) - np.sqrt(1 / g - 1) * 0.3, "y0": torch.full_like(y_T, 0.3),
                "v": np.sqrt(g) * y_T - np.sqrt(1 - g) * 0.3}[prediction]
    assert seen == [pytest.approx(np.sqrt(g))]
    torch.testing.assert_close(out, expected.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prediction", ["eps", "y0", "v"])
def test_plan_y0_coefficients_invert_the_target(prediction):
    # y_t = sqrt(g) y0 + sqrt(1 - g) eps; the target written out here from its definition.
    schedule = sr3.NoiseSchedule.cosine(30)
    plan = sr3.make_plan(schedule, sr3.SamplerConfig(clip=False), prediction)
    rng = np.random.default_rng(0)
    y0, eps = rng.uniform(-1, 1, plan.num_steps), rng.standard_normal(plan.num_steps)
    level = np.sqrt(schedule.gammas[::-1])
    y_t = level * y0 + np.sqrt(1 - level**2) * eps
    target = {"eps": eps, "y0": y0, "v": level * eps - np.sqrt(1 - level**2) * y0}[prediction]
    np.testing.assert_allclose(plan.state_coef * y_t - plan.output_coef * target, y0, rtol=1e-9, atol=1e-9)


def _gaussian_flow_endpoint(y_T: torch.Tensor, gamma_T: float, s: float) -> torch.Tensor:
    # For data y0 ~ N(0, s^2) the probability-flow ODE keeps y_t / sqrt(gamma s^2 + 1 - gamma)
    # constant, so its exact end point from y_T is known in closed form.
    return s * y_T / np.sqrt(gamma_T * s * s + 1.0 - gamma_T)


def _gaussian_denoiser(s: float, prediction: str):
    # The exact E[y0 | y_t] for y0 ~ N(0, s^2), returned as the target of `prediction`.
    def denoise(x_up, y_t, noise_level):
        level = noise_level.double().view(-1, 1, 1, 1)
        gamma, y = level * level, y_t.double()
        y0 = level * s * s * y / (gamma * s * s + 1.0 - gamma)
        eps = (y - level * y0) / torch.sqrt(1.0 - gamma)
        return {"eps": eps, "y0": y0, "v": level * eps - torch.sqrt(1.0 - gamma) * y0}[prediction].float()

    return denoise


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_dpm_solver_2m_is_second_order_on_the_gaussian_flow(prediction):
    # DDIM is the first-order solver of the same ODE; with few steps the second-order
    # multistep method must be far closer to the exact end point, and converge faster.
    s = 0.5
    y_T = torch.randn(1, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    errors = {}
    for name in ("ddim", "dpmpp_2m"):
        for steps in (16, 32):
            schedule = sr3.NoiseSchedule.cosine(1000).respaced(steps)
            plan = sr3.make_plan(schedule, sr3.SamplerConfig(name, clip=False), prediction)
            out = run_plan(_gaussian_denoiser(s, prediction), torch.zeros_like(y_T), y_T, plan)
            exact = _gaussian_flow_endpoint(y_T, float(schedule.gammas[-1]), s)
            errors[name, steps] = float((out - exact).abs().max())
    assert errors["dpmpp_2m", 16] < errors["ddim", 16] / 5
    assert errors["ddim", 16] / errors["ddim", 32] < 2.5  # first order: about 2
    assert errors["dpmpp_2m", 16] / errors["dpmpp_2m", 32] > 3.0  # second order: about 4
    assert errors["dpmpp_2m", 32] < 1e-2


def test_dpm_solver_2m_plan_follows_the_paper():
    # Lu et al. 2022, algorithm 2 (DPM-Solver++(2M)), written out over lambda for a made-up
    # network, against the plan run through the posterior-step op.
    schedule = sr3.NoiseSchedule.linear(2000, 1e-6, 1e-2).respaced(7)
    plan = dpmpp_2m_plan(schedule, sr3.SamplerConfig("dpmpp_2m", clip=False))
    assert plan.multistep and np.all(plan.sigma == 0) and plan.extrapolation[0] == plan.extrapolation[-1] == 0

    def network(x_up, y_t, level):
        return torch.tanh(1.5 * y_t.double() + level.double().view(-1, 1, 1, 1)).to(y_t.dtype)

    y_T = torch.randn(1, 3, 5, 4, generator=torch.Generator().manual_seed(3))
    gammas = np.concatenate([[1.0], schedule.gammas])  # gammas[t] for t = 0..T
    alpha, sigma = np.sqrt(gammas), np.sqrt(1 - gammas)
    lam = lambda t: np.log(alpha[t] / sigma[t]) if t > 0 else np.inf  # noqa: E731
    y, previous, h_previous = y_T.double(), None, None
    for t in range(schedule.num_steps, 0, -1):
        level = torch.tensor([alpha[t]])
        y0_hat = (y - sigma[t] * network(None, y.float(), level).double()) / alpha[t]  # an eps network
        h = lam(t - 1) - lam(t)
        if previous is None or t == 1:
            d = y0_hat
        else:
            r = h_previous / h
            d = (1 + 1 / (2 * r)) * y0_hat - 1 / (2 * r) * previous
        y = sigma[t - 1] / sigma[t] * y - alpha[t - 1] * np.expm1(-h) * d
        previous, h_previous = y0_hat, h
    out = run_plan(network, torch.zeros_like(y_T), y_T, plan)
    torch.testing.assert_close(out, y.float(), rtol=1e-4, atol=1e-5)


def test_a_warm_start_does_not_extrapolate_from_a_step_it_did_not_run():
    plan = sr3.make_plan(sr3.NoiseSchedule.linear(20, 1e-4, 0.1), sr3.SamplerConfig("dpmpp_2m", strength=0.5))
    full = sr3.make_plan(sr3.NoiseSchedule.linear(20, 1e-4, 0.1), sr3.SamplerConfig("dpmpp_2m"))
    assert plan.num_steps == 10 and plan.warm_start and plan.extrapolation[0] == 0.0
    np.testing.assert_array_equal(plan.extrapolation[1:], full.extrapolation[11:])


def test_ancestral_plan_is_the_reversed_posterior():
    schedule = sr3.NoiseSchedule.linear(30, 1e-4, 0.1)
    plan = ancestral_plan(schedule, sr3.SamplerConfig())
    np.testing.assert_array_equal(plan.timesteps, np.arange(30, 0, -1))
    np.testing.assert_array_equal(plan.coef1, schedule.coef1[::-1])
    np.testing.assert_array_equal(plan.coef2, schedule.coef2[::-1])
    np.testing.assert_array_equal(plan.sigma[:-1], schedule.posterior_sigma[::-1][:-1])
    assert plan.sigma[-1] == 0.0
    beta_plan = ancestral_plan(schedule, sr3.SamplerConfig(sigma="beta"))
    np.testing.assert_allclose(beta_plan.sigma[:-1], np.sqrt(1 - schedule.alphas[::-1][:-1]))
    assert beta_plan.sigma[-1] == 0.0


def test_ddim_with_eta_one_is_the_ddpm_posterior():
    schedule = sr3.NoiseSchedule.cosine(40)
    ddim = ddim_plan(schedule, sr3.SamplerConfig("ddim", eta=1.0))
    ddpm = ancestral_plan(schedule, sr3.SamplerConfig())
    for name in ("coef1", "coef2", "sigma"):
        np.testing.assert_allclose(getattr(ddim, name), getattr(ddpm, name), rtol=1e-9, atol=1e-12, err_msg=name)


def test_deterministic_ddim_follows_the_eps_trajectory():
    schedule = sr3.NoiseSchedule.linear(10, 1e-3, 0.3)
    plan = ddim_plan(schedule, sr3.SamplerConfig("ddim", clip=False))
    assert np.all(plan.sigma == 0.0)
    g, g_prev = schedule.gammas[::-1], schedule.gammas_prev[::-1]
    y_t, eps = 0.7, -0.4
    y0_hat = y_t / np.sqrt(g) - np.sqrt(1 / g - 1) * eps
    expected = np.sqrt(g_prev) * y0_hat + np.sqrt(1 - g_prev) * eps
    got = plan.coef1 * y0_hat + plan.coef2 * y_t
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)


def test_deterministic_ddim_ignores_the_generator(tiny_model):
    schedule = sr3.NoiseSchedule.linear(6, 1e-3, 0.2)
    x = torch.rand(1, 3, 8, 8) * 2 - 1
    y_T = torch.randn(1, 3, 8, 8)
    ddim, ancestral = (sr3.make_plan(schedule, sr3.SamplerConfig(name)) for name in ("ddim", "ancestral"))
    with torch.no_grad():
        a = run_plan(tiny_model, x, y_T, ddim, generator=torch.Generator().manual_seed(1))
        b = run_plan(tiny_model, x, y_T, ddim, generator=torch.Generator().manual_seed(2))
        c = run_plan(tiny_model, x, y_T, ancestral, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)


def test_callback_sees_every_step():
    seen = []
    y0 = torch.zeros(1, 3, 2, 2)
    sr3.sample(oracle_denoiser(y0), y0, sr3.NoiseSchedule.linear(7, 1e-3, 0.2),
               callback=lambda i, total, y: seen.append((i, total, tuple(y.shape))))
    assert seen == [(i, 7, (1, 3, 2, 2)) for i in range(7)]


@pytest.mark.parametrize("name", ["ancestral", "ddim", "dpmpp_2m"])
def test_the_public_sample_honours_strength(name):
    # The warm start runs the last 5 of 20 steps from the condition diffused by q(y_t | y_0):
    # with the condition equal to y0 and an oracle, every step sees a state on y0's trajectory.
    g = torch.Generator().manual_seed(3)
    y0 = torch.rand(1, 3, 5, 5, generator=g) * 1.8 - 0.9
    seen = []
    out = sr3.sample(oracle_denoiser(y0), y0, sr3.NoiseSchedule.linear(20, 1e-4, 0.1),
                     sr3.SamplerConfig(name, strength=0.25), generator=torch.Generator().manual_seed(0),
                     callback=lambda i, total, y: seen.append(total))
    assert seen == [5] * 5
    assert (out - y0).abs().max().item() < 1e-3


def test_a_non_finite_output_names_the_step():
    calls = []

    def breaks_at_third_call(x_up, y_t, level):
        calls.append(1)
        return torch.full_like(y_t, float("nan")) if len(calls) == 3 else torch.zeros_like(y_t)

    schedule = sr3.NoiseSchedule.linear(5, 1e-3, 0.2)
    plan = ancestral_plan(schedule, sr3.SamplerConfig(clip=False))
    with pytest.raises(FloatingPointError, match=r"step 3 of 5 \(t=3"):
        run_plan(breaks_at_third_call, torch.zeros(1, 3, 2, 2), torch.zeros(1, 3, 2, 2), plan,
                 generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("config", [sr3.SamplerConfig(strength=0.3), sr3.SamplerConfig("ddim", strength=0.5),
                                    sr3.SamplerConfig("dpmpp_2m", strength=0.4)])
def test_oracle_recovers_y0_from_a_warm_start(config):
    g = torch.Generator().manual_seed(2)
    y0 = torch.rand(1, 3, 6, 6, generator=g) * 1.8 - 0.9
    x_up = (y0 + 0.05 * torch.randn(y0.shape, generator=g)).clamp(-1, 1)
    plan = sr3.make_plan(sr3.NoiseSchedule.linear(40, 1e-4, 0.1), config)
    y_start = initial_state(plan, x_up, torch.randn(y0.shape, generator=g))
    out = run_plan(oracle_denoiser(y0), x_up, y_start, plan, generator=g)
    assert (out - y0).abs().max().item() < 1e-3


def test_strength_runs_the_last_steps_from_the_diffused_condition():
    schedule = sr3.NoiseSchedule.linear(20, 1e-4, 0.1)
    full = sr3.make_plan(schedule, sr3.SamplerConfig())
    warm = sr3.make_plan(schedule, sr3.SamplerConfig(strength=0.25))
    assert warm.num_steps == 5 and warm.warm_start and not full.warm_start
    np.testing.assert_array_equal(warm.timesteps, [5, 4, 3, 2, 1])
    np.testing.assert_array_equal(warm.coef1, full.coef1[-5:])
    x_up, z = torch.full((1, 3, 2, 2), 0.5), torch.ones(1, 3, 2, 2)
    level = schedule.noise_levels[4]
    torch.testing.assert_close(initial_state(warm, x_up, z), torch.full_like(z, 0.5 * level + (1 - level**2) ** 0.5))
    torch.testing.assert_close(initial_state(full, x_up, z), z)
    with pytest.raises(ValueError, match="strength"):
        sr3.SamplerConfig(strength=0.0)
