"""Schedule tables against the equations, computed here independently with Python floats."""

import math

import numpy as np
import pytest

import sr3_engine as sr3


def _gammas(betas):
    out, g = [], 1.0
    for b in betas:
        g *= 1.0 - b
        out.append(g)
    return out


@pytest.mark.parametrize(
    "schedule, expected_betas",
    [
        (sr3.NoiseSchedule.linear(5, 1e-4, 0.1), [1e-4 + i * (0.1 - 1e-4) / 4 for i in range(5)]),
        (sr3.NoiseSchedule.quad(4, 1e-4, 0.09), [(0.01 + i * (0.3 - 0.01) / 3) ** 2 for i in range(4)]),
        (sr3.NoiseSchedule.const(3, 0.02), [0.02, 0.02, 0.02]),
        (sr3.NoiseSchedule.warmup(10, 1e-3, 0.05, frac=0.3), [1e-3, 1e-3 + 0.049 / 2, 0.05] + [0.05] * 7),
    ],
    ids=["linear", "quad", "const", "warmup"],
)
def test_betas_match_the_definitions(schedule, expected_betas):
    np.testing.assert_allclose(schedule.betas, expected_betas, rtol=1e-12, atol=0)
    assert schedule.betas.dtype == np.float64


def test_cosine_follows_nichol_dhariwal():
    steps, s = 50, 8e-3
    f = [math.cos((t / steps + s) / (1 + s) * math.pi / 2) ** 2 for t in range(steps + 1)]
    expected = [min(1 - f[t] / f[t - 1], 0.999) for t in range(1, steps + 1)]
    schedule = sr3.NoiseSchedule.cosine(steps, s)
    np.testing.assert_allclose(schedule.betas, expected, rtol=1e-10)
    np.testing.assert_allclose(schedule.gammas[:-1], [f[t] / f[0] for t in range(1, steps)], rtol=1e-9)


@pytest.mark.parametrize("make", [
    lambda: sr3.NoiseSchedule.linear(2000, 1e-6, 1e-2),
    lambda: sr3.NoiseSchedule.linear(100, 1e-4, 0.1),
    lambda: sr3.NoiseSchedule.cosine(30),
    lambda: sr3.NoiseSchedule.warmup(40, 1e-4, 0.02, 0.5),
])
def test_derived_tables_follow_equation_4(make):
    schedule = make()
    betas = [float(b) for b in schedule.betas]
    gammas = _gammas(betas)
    prev = [1.0] + gammas[:-1]
    for name, expected in {
        "alphas": [1 - b for b in betas],
        "gammas": gammas,
        "gammas_prev": prev,
        "noise_levels": [math.sqrt(g) for g in gammas],
        "coef1": [math.sqrt(p) * b / (1 - g) for p, b, g in zip(prev, betas, gammas)],
        "coef2": [math.sqrt(1 - b) * (1 - p) / (1 - g) for p, b, g in zip(prev, betas, gammas)],
        "posterior_sigma": [math.sqrt((1 - p) * b / (1 - g)) for p, b, g in zip(prev, betas, gammas)],
        "beta_sigma": [math.sqrt(b) for b in betas],
    }.items():
        np.testing.assert_allclose(getattr(schedule, name), expected, rtol=1e-9, atol=1e-15, err_msg=name)


def test_posterior_mean_is_a_convex_combination_at_t1():
    schedule = sr3.NoiseSchedule.linear(10, 1e-3, 0.2)
    assert schedule.coef1[0] == pytest.approx(1.0)
    assert schedule.coef2[0] == pytest.approx(0.0, abs=1e-15)
    assert schedule.posterior_sigma[0] == 0.0


@pytest.mark.parametrize("steps, n", [(2000, 100), (1000, 7), (10, 10), (2000, 1)])
def test_respacing_keeps_the_noise_levels_of_the_kept_steps(steps, n):
    base = sr3.NoiseSchedule.linear(steps, 1e-6, 1e-2)
    respaced = base.respaced(n)
    assert respaced.num_steps == n
    kept = [round(i * steps / n) for i in range(1, n + 1)]
    np.testing.assert_allclose(respaced.gammas, base.gammas[np.array(kept) - 1], rtol=1e-12)
    assert respaced.gammas[-1] == pytest.approx(base.gammas[-1], rel=1e-12)
    assert respaced.respaced(n // 2 or 1).num_steps == (n // 2 or 1)


def test_schedule_config_round_trips_through_json():
    config = sr3.ScheduleConfig("warmup", 300, 1e-5, 0.02, warmup_frac=0.25, respace=30)
    again = sr3.ScheduleConfig.from_json(config.to_json())
    assert again == config
    np.testing.assert_array_equal(sr3.NoiseSchedule.from_config(again).betas,
                                  sr3.NoiseSchedule.from_config(config).betas)


def test_tables_are_read_only():
    schedule = sr3.NoiseSchedule.linear(10)
    with pytest.raises(ValueError):
        schedule.gammas[0] = 0.5


@pytest.mark.parametrize("kwargs, message", [
    ({"kind": "sigmoid"}, "kind"),
    ({"steps": 0}, "steps"),
    ({"start": 0.2, "end": 0.1}, "start <= end"),
    ({"respace": 5000}, "respace"),
])
def test_bad_schedule_configs_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sr3.ScheduleConfig(**kwargs)
