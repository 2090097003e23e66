"""The bundled demo-x4 model and the demo command."""

import numpy as np
import pytest
import torch
from PIL import Image

import sr3_engine as sr3
from sr3_engine.cli import demo
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
