"""`python -m sr3_engine evaluate` against PSNR computed here from its definition."""

import io
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import sr3_engine as sr3
from sr3_engine import resize
from sr3_engine.cli import evaluate
from sr3_engine.training.data import make_lr


def _psnr_8bit(a: torch.Tensor, b: torch.Tensor) -> float:
    a8 = np.round(np.clip(a.double().numpy(), 0, 1) * 255.0)
    b8 = np.round(np.clip(b.double().numpy(), 0, 1) * 255.0)
    return 10.0 * math.log10(255.0**2 / np.mean((a8 - b8) ** 2))


@pytest.fixture
def two_photos(tmp_path):
    y, x = np.mgrid[0:40, 0:36]
    for i in range(2):
        rgb = np.stack([(x * 7 + i * 50) % 256, (y * 5) % 256, ((x + y) * 3 + 80 * i) % 256], axis=-1)
        Image.fromarray(rgb.astype(np.uint8)).save(tmp_path / f"photo{i}.png")
    return tmp_path


def test_evaluate_scores_match_first_principles(tiny_model, two_photos, tmp_path):
    model_dir = tmp_path / "model"
    engine = sr3.SR3Engine(tiny_model, schedule=sr3.NoiseSchedule.linear(4, 1e-3, 0.2), scale=2, progress=False)
    engine.save_pretrained(model_dir)
    out = tmp_path / "eval"
    code = evaluate.main(["--model", str(model_dir), "--data", str(two_photos), "--scale", "2", "--crop", "16",
                          "--out", str(out)])
    assert code == 0
    report = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in report["images"]] == ["photo0", "photo1"]
    assert Image.open(out / "contact_sheet.png").size[0] == 4 * 16 + 3 * 4

    crops = []
    for i in range(2):
        full = torch.from_numpy(np.asarray(Image.open(two_photos / f"photo{i}.png"), dtype=np.float32) / 255.0)
        crops.append(full.permute(2, 0, 1)[:, 12:28, 10:26])
    hr = torch.stack(crops)
    lr = make_lr(hr, 2)
    bicubic = resize.upsample(lr, 2).clamp(0, 1)
    # evaluate samples the whole batch with one generator seeded 0, so the test does too.
    sample = sr3.SR3Engine.from_pretrained(model_dir, progress=False).sample(lr, generator=torch.Generator().manual_seed(0))
    for i, row in enumerate(report["images"]):
        assert row["bicubic"]["psnr"] == pytest.approx(_psnr_8bit(bicubic[i], hr[i]), abs=1e-9)
        assert row["model"]["psnr"] == pytest.approx(_psnr_8bit(sample[i], hr[i]), abs=1e-9)


def test_evaluate_usage_errors(tmp_path):
    assert evaluate.main(["--model", str(tmp_path / "none"), "--data", str(tmp_path), "--scale", "2"]) == 2
    with pytest.raises(SystemExit) as info:
        evaluate.main(["--model", "x", "--data", str(tmp_path), "--scale", "3", "--crop", "16"])
    assert info.value.code == 2


def _saved_model(tiny_model, directory):
    engine = sr3.SR3Engine(tiny_model, schedule=sr3.NoiseSchedule.linear(4, 1e-3, 0.2), scale=2, progress=False)
    return engine.save_pretrained(directory)


def test_an_image_that_cannot_be_decoded_is_skipped_with_one_line(tiny_model, two_photos, tmp_path, capsys):
    model_dir = _saved_model(tiny_model, tmp_path / "model")
    whole = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(whole, "JPEG")
    broken = two_photos / "broken.jpg"
    broken.write_bytes(whole.getvalue()[: len(whole.getvalue()) // 2])  # the header parses, the pixels do not
    out = tmp_path / "eval"
    assert evaluate.main(["--model", str(model_dir), "--data", str(two_photos), "--scale", "2", "--crop", "16",
                          "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.splitlines()) == 1
    assert err.startswith(f"sr3_engine: warning: {broken}: corrupt or truncated image data") and "skipped" in err
    report = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in report["images"]] == ["photo0", "photo1"] and report["skipped"] == [str(broken)]


def test_tiling_and_memory_flags_reach_the_engine(tiny_model, two_photos, tmp_path, monkeypatch):
    model_dir = _saved_model(tiny_model, tmp_path / "model")
    seen = {}
    from_pretrained, sample = sr3.SR3Engine.from_pretrained, sr3.SR3Engine.sample

    def load(*args, **kwargs):
        seen["max_memory"] = kwargs["max_memory"]
        return from_pretrained(*args, **kwargs)

    def sample_recorded(self, lr, **kwargs):
        seen["tile"], seen["tile_overlap"] = kwargs["tile"], kwargs["tile_overlap"]
        return sample(self, lr, **kwargs)

    monkeypatch.setattr(sr3.SR3Engine, "from_pretrained", load)
    monkeypatch.setattr(sr3.SR3Engine, "sample", sample_recorded)
    args = ["--model", str(model_dir), "--data", str(two_photos), "--scale", "2", "--crop", "16"]
    assert evaluate.main([*args, "--out", str(tmp_path / "auto")]) == 0
    assert seen == {"max_memory": None, "tile": None, "tile_overlap": None}
    assert evaluate.main([*args, "--out", str(tmp_path / "tiled"), "--tile", "8", "--tile-overlap", "2",
                          "--max-memory", "1G"]) == 0
    assert seen == {"max_memory": 2**30, "tile": 16, "tile_overlap": 4}
