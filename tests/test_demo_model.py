"""The bundled demo-x4 model and the demo command."""

import numpy as np
import pytest
import torch
from PIL import Image

import sr3_engine as sr3
from sr3_engine.cli import demo
from sr3_engine.io import load_image, pil_to_tensor
from sr3_engine.runtime.model_dir import ASSETS_DIR

pytestmark = pytest.mark.skipif(not (ASSETS_DIR / "demo-x4" / "config.json").is_file(),
                                reason="the demo-x4 weights are not bundled in this checkout")


def test_bundled_model_is_listed_and_small():
    assert "demo-x4" in sr3.bundled_models()
    assert (ASSETS_DIR / "demo-x4" / "model.safetensors").stat().st_size < 16 * 2**20


def test_bundled_model_samples_a_crop_deterministically():
    engine = sr3.SR3Engine.from_pretrained("demo-x4", progress=False)
    assert engine.scale == 4
    lr = torch.rand(1, 3, 12, 8, generator=torch.Generator().manual_seed(0))
    a = engine.sample(lr, generator=torch.Generator().manual_seed(5), steps=8)
    b = engine.sample(lr, generator=torch.Generator().manual_seed(5), steps=8)
    assert a.shape == (1, 3, 48, 32)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert torch.isfinite(a).all()


def test_bundled_model_predicts_v_of_the_residual_and_its_samples_vary_with_the_seed():
    # A model that regresses y0 whatever y_t is (the collapse a y0 target risks) would give one
    # output for every seed; from pure noise, SR3 draws different plausible images.
    engine = sr3.SR3Engine.from_pretrained("demo-x4", progress=False)
    assert engine.prediction == "v" and engine.residual_scale == 4.0
    lr = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    pure = sr3.SamplerConfig("ancestral")
    a, b = (engine.sample(lr, generator=torch.Generator().manual_seed(seed), steps=10, sampler=pure) for seed in (1, 2))
    assert (a - b).abs().mean().item() > 1e-3


def test_demo_writes_the_output_and_the_sheet(tmp_path, capsys):
    assert demo.main(["--out", str(tmp_path), "--steps", "4"]) == 0
    printed = capsys.readouterr().out
    assert (tmp_path / "chelsea-sr3.png").is_file() and (tmp_path / "chelsea-sheet.png").is_file()
    assert "chelsea-sheet.png" in printed and "sampling took" in printed and "detail SR3" in printed


def test_the_demo_on_the_fused_backend_draws_the_eager_backends_image(tmp_path, capsys):
    # fused is the demo's default; on the CPU it takes its noise from the generator as eager does.
    for backend in ("eager", "fused"):
        assert demo.main(["--out", str(tmp_path / backend), "--steps", "4", "--backend", backend]) == 0
        assert f"{backend} backend" in capsys.readouterr().out
    eager, fused = (np.asarray(Image.open(tmp_path / b / "chelsea-sr3.png"), dtype=np.int16) for b in ("eager", "fused"))
    assert np.abs(eager - fused).max() <= 1


def test_the_demo_runs_another_sampler_when_asked(tmp_path, capsys):
    args = ["--out", str(tmp_path), "--sampler", "ancestral", "--strength", "1", "--steps", "3"]
    assert demo.main(args) == 0
    assert "(ancestral, 3 denoising steps, strength 1.0," in capsys.readouterr().out
    assert demo.main(["--out", str(tmp_path), "--strength", "0"]) == 2
    assert "--strength: SamplerConfig.strength must be in (0, 1]" in capsys.readouterr().err


# demo-x4-fast: demo-x4 distilled (RECIPE.md, "Fast sampling: distillation") from demo-x4's
# DDIM at 8 steps down by halving; whatever number of steps it ships with, its samples stand in
# for those 8 teacher steps.
FAST = ASSETS_DIR / "demo-x4-fast"
DISTILLED_FROM_STEPS = 8
fast_bundled = pytest.mark.skipif(not (FAST / "config.json").is_file(),
                                  reason="the demo-x4-fast weights are not bundled in this checkout")


def _count_network_calls(engine: sr3.SR3Engine) -> list[int]:
    calls = [0]
    engine.model.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@fast_bundled
def test_the_fast_model_samples_from_pure_noise_in_at_most_four_network_evaluations():
    assert "demo-x4-fast" in sr3.bundled_models()
    assert (FAST / "model.safetensors").stat().st_size < 16 * 2**20
    engine = sr3.SR3Engine.from_pretrained("demo-x4-fast", backend="eager", progress=False)
    teacher = sr3.SR3Engine.from_pretrained("demo-x4", backend="eager", progress=False)
    assert engine.model.config == teacher.model.config and engine.scale == teacher.scale
    config = engine.sampler_config()
    assert (config.name, config.eta, config.strength) == ("ddim", 0.0, 1.0)
    calls = _count_network_calls(engine)
    lr = torch.rand(2, 3, 8, 12, generator=torch.Generator().manual_seed(0))
    a, b = (engine.sample(lr, generator=torch.Generator().manual_seed(seed)) for seed in (1, 2))
    assert 1 <= calls[0] // 2 <= 4 and calls[0] % 2 == 0
    assert a.shape == (2, 3, 32, 48) and torch.isfinite(a).all()
    assert (a - b).abs().mean().item() > 1e-3


@fast_bundled
def test_the_fast_model_draws_what_its_teachers_eight_steps_draw_closer_than_the_teacher_does_in_as_few():
    # The claim of distillation, on a photo that neither model saw in training: from the same
    # pure noise, the student's few steps land nearer the teacher's 8 DDIM steps than the
    # teacher's own DDIM does in the student's number of steps.
    lr = pil_to_tensor(load_image(ASSETS_DIR / "photos" / "chelsea-lr.png"))[None][..., 16:48, 16:48]
    student = sr3.SR3Engine.from_pretrained("demo-x4-fast", backend="eager", progress=False)
    teacher = sr3.SR3Engine.from_pretrained("demo-x4", backend="eager", progress=False)
    steps = student.schedule_for().num_steps
    ddim = sr3.SamplerConfig("ddim")

    def draw(engine, **kwargs):
        return engine.sample(lr, generator=torch.Generator().manual_seed(0), **kwargs)

    target = draw(teacher, steps=DISTILLED_FROM_STEPS, sampler=ddim)
    distilled = (draw(student) - target).square().mean()
    undistilled = (draw(teacher, steps=steps, sampler=ddim) - target).square().mean()
    assert steps < DISTILLED_FROM_STEPS
    assert distilled < 0.5 * undistilled
