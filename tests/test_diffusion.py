"""Forward process and training loss (eq. 5-6)."""

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn as nn

import sr3_engine as sr3


def test_q_sample_formula():
    y0 = torch.rand(3, 3, 4, 4) * 2 - 1
    noise = torch.randn(3, 3, 4, 4)
    level = torch.tensor([0.1, 0.5, 0.99])
    out = sr3.q_sample(y0, level, noise)
    for i, v in enumerate(level.tolist()):
        torch.testing.assert_close(out[i], v * y0[i] + (1 - v * v) ** 0.5 * noise[i])


@pytest.mark.parametrize("space", ["sqrt_gamma", "gamma"])
def test_noise_levels_are_uniform_between_neighbouring_levels(space):
    schedule = sr3.NoiseSchedule.linear(5, 0.05, 0.4)
    draws = sr3.sample_noise_levels(schedule, 50_000, generator=torch.Generator().manual_seed(0), space=space)
    assert draws.dtype == torch.float32 and draws.shape == (50_000,)
    values = draws.double().numpy()
    edges = np.concatenate(([1.0], schedule.noise_levels))
    if space == "gamma":
        values, edges = values**2, edges**2
    assert values.min() >= edges[-1] - 1e-6 and values.max() <= 1.0 + 1e-6
    for t in range(1, 6):
        inside = values[(values <= edges[t - 1]) & (values >= edges[t])]
        assert abs(inside.size / values.size - 0.2) < 0.01
        # Uniform within the interval: its mean is the interval's midpoint.
        assert abs(inside.mean() - (edges[t - 1] + edges[t]) / 2) < 0.01 * (edges[t - 1] - edges[t]) + 1e-4


@pytest.mark.parametrize("prediction", ["eps", "y0", "v"])
@pytest.mark.parametrize("p", [1, 2])
def test_loss_is_the_mean_p_norm_of_the_target_error(p, prediction):
    seen = {}

    def model(x_up, y_noisy, level):
        seen.update(y=y_noisy, level=level)
        return 0.5 * x_up

    schedule = sr3.NoiseSchedule.linear(100, 1e-4, 0.05)
    y0 = torch.rand(4, 3, 6, 5) * 2 - 1
    x_up = torch.rand(4, 3, 6, 5) * 2 - 1
    loss = sr3.diffusion_loss(model, x_up, y0, schedule, p=p, generator=torch.Generator().manual_seed(3),
                              prediction=prediction)
    level = seen["level"].view(-1, 1, 1, 1).double()
    noise = (seen["y"].double() - level * y0.double()) / torch.sqrt(1 - level * level)
    target = {"eps": noise, "y0": y0.double(), "v": level * noise - torch.sqrt(1 - level * level) * y0.double()}
    expected = ((0.5 * x_up.double() - target[prediction]).abs() ** p).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_a_residual_models_loss_diffuses_the_scaled_residual_over_the_condition(prediction):
    seen = {}

    class ResidualModel(nn.Module):
        config = dataclasses.replace(sr3.UNetConfig.named("tiny"), prediction=prediction, residual_scale=3.0)

        def forward(self, x_up, y_noisy, level):
            seen.update(y=y_noisy, level=level)
            return torch.zeros_like(y_noisy)

    schedule = sr3.NoiseSchedule.linear(100, 1e-4, 0.05)
    g = torch.Generator().manual_seed(2)
    y0 = torch.rand(3, 3, 5, 4, generator=g) * 2 - 1
    x_up = torch.rand(3, 3, 5, 4, generator=g) * 2 - 1
    loss = sr3.diffusion_loss(ResidualModel(), x_up, y0, schedule, p=2, generator=torch.Generator().manual_seed(3))
    level = seen["level"].view(-1, 1, 1, 1).double()
    d0 = 3.0 * (y0.double() - x_up.double())
    # The noise is redrawn from the same generator state: the forward process of d0, not of y0.
    g = torch.Generator().manual_seed(3)
    sr3.sample_noise_levels(schedule, 3, generator=g)
    noise = torch.randn(y0.shape, generator=g).double()
    torch.testing.assert_close(seen["y"].double(), level * d0 + torch.sqrt(1 - level * level) * noise,
                               rtol=1e-5, atol=1e-5)
    target = noise if prediction == "eps" else level * noise - torch.sqrt(1 - level * level) * d0
    assert loss.item() == pytest.approx((target**2).mean().item(), rel=1e-5)


def test_the_diffused_variable_round_trips():
    g = torch.Generator().manual_seed(0)
    y0, x_up = torch.rand(2, 3, 4, 4, generator=g) * 2 - 1, torch.rand(2, 3, 4, 4, generator=g) * 2 - 1
    assert sr3.to_diffused(y0, x_up, None) is y0 and sr3.from_diffused(y0, x_up, None) is y0
    d0 = sr3.to_diffused(y0, x_up, 4.0)
    torch.testing.assert_close(d0, 4.0 * (y0 - x_up))
    torch.testing.assert_close(sr3.from_diffused(d0, x_up, 4.0), y0)


def test_loss_rejects_bad_p():
    x = torch.zeros(1, 3, 4, 4)
    with pytest.raises(ValueError, match="p must be 1 or 2"):
        sr3.diffusion_loss(lambda *a: a[1], x, x, sr3.NoiseSchedule.linear(5), p=3)


def test_the_loss_follows_the_models_prediction_target():
    config = sr3.UNetConfig.named("tiny")
    schedule = sr3.NoiseSchedule.linear(100, 1e-4, 0.05)
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    losses = {}
    for prediction in ("eps", "v"):
        torch.manual_seed(0)
        model = sr3.SR3UNet(dataclasses.replace(config, prediction=prediction))
        losses[prediction] = sr3.diffusion_loss(model, x, x, schedule, generator=torch.Generator().manual_seed(1))
        explicit = sr3.diffusion_loss(model, x, x, schedule, generator=torch.Generator().manual_seed(1),
                                      prediction=prediction)
        assert losses[prediction].item() == explicit.item()
    assert losses["eps"].item() != losses["v"].item()


@pytest.mark.parametrize("prediction, residual_scale", [("eps", None), ("y0", None), ("v", None), ("v", 4.0)])
def test_a_few_optimiser_steps_lower_the_loss(prediction, residual_scale):
    torch.manual_seed(1234)
    tiny_model = sr3.SR3UNet(dataclasses.replace(sr3.UNetConfig.named("tiny"), prediction=prediction,
                                                 residual_scale=residual_scale))
    tiny_model.train()
    schedule = sr3.NoiseSchedule.linear(2000, 1e-6, 1e-2)
    g = torch.Generator().manual_seed(0)
    y0 = torch.rand(4, 3, 16, 16, generator=g) * 2 - 1
    x_up = (y0 + 0.1 * torch.randn(4, 3, 16, 16, generator=g)).clamp(-1, 1)
    optimiser = torch.optim.Adam(tiny_model.parameters(), lr=2e-3)

    def loss_at(seed):
        return sr3.diffusion_loss(tiny_model, x_up, y0, schedule, p=1, generator=torch.Generator().manual_seed(seed))

    with torch.no_grad():
        before = sum(loss_at(s).item() for s in range(4))
    for step in range(30):
        optimiser.zero_grad()
        loss_at(step % 4).backward()
        optimiser.step()
    with torch.no_grad():
        after = sum(loss_at(s).item() for s in range(4))
    assert after < 0.8 * before
