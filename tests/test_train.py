import hashlib
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import sr3_engine as sr3
from sr3_engine.cli import train
from sr3_engine.runtime import model_dir
from sr3_engine.training import checkpoint, data
from sr3_engine.training.trainer import KILL_AFTER_SAVE_ENV

REPO = Path(__file__).resolve().parents[1]
TINY = ["--config", "tiny", "--scale", "4", "--hr-size", "32", "--batch-size", "2", "--log-every", "1",
        "--warmup-steps", "2", "--sample-steps", "4", "--seed", "7"]


# Training processes here (in-process and child) use one thread each (conftest.one_torch_thread).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _gradient_image(index: int, size: int = 48) -> Image.Image:
    y, x = np.mgrid[0:size, 0:size]
    rgb = np.stack([(x * 5 + index * 20) % 256, (y * 4 + index * 30) % 256, ((x + y) * 3 + index * 7) % 256], -1)
    return Image.fromarray(rgb.astype(np.uint8))


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """Six 48x48 gradient images (two in a subfolder) and one 16x16 image too small to crop."""
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    for i in range(6):
        _gradient_image(i).save(root / ("sub" if i >= 4 else "") / f"{i}.png")
    _gradient_image(9, size=16).save(root / "small.png")
    return root


def _states_equal(a: dict, b: dict) -> list[str]:
    """Names of the tensors that differ between two training states' model and EMA weights."""
    return [f"{part}.{name}" for part in ("model", "ema") for name in a[part]
            if not torch.equal(a[part][name], b[part][name])]


def _load(out: Path) -> dict:
    return torch.load(out / checkpoint.STATE_FILE, weights_only=True)


def _records(out: Path, kind: str) -> list[dict]:
    lines = (out / checkpoint.LOG_FILE).read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == kind]


def _cli(args: list[str], env: dict[str, str] | None = None, module: list[str] | None = None):
    environment = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})}
    command = [sys.executable, *(module or ["-m", "sr3_engine.train"]), *args]
    return subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=240)


def test_short_run_writes_a_loadable_model_and_a_log(images, tmp_path, capsys):
    out = tmp_path / "run"
    code = train.main(["--data", str(images), "--val-data", str(images / "sub"), "--out", str(out),
                       "--steps", "4", "--save-every", "2", "--val-every", "2", *TINY])
    assert code == 0
    assert "skipped 1 image(s)" in capsys.readouterr().err

    engine = sr3.SR3Engine.from_pretrained(out / checkpoint.MODEL_DIR)
    assert engine.scale == 4 and engine.schedule.num_steps == 4
    hr = engine.sample(torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0)),
                       generator=torch.Generator().manual_seed(0))
    assert hr.shape == (1, 3, 32, 32) and torch.isfinite(hr).all()
    state = _load(out)
    saved = load_file(str(out / checkpoint.MODEL_DIR / "model.safetensors"))
    assert all(torch.equal(saved[k], v) for k, v in state["ema"].items()), "model/ must hold the EMA weights"

    assert [r["step"] for r in _records(out, "train")] == [1, 2, 3, 4]
    validations = _records(out, "validation")
    assert [r["step"] for r in validations] == [2, 4]
    assert all(np.isfinite([r["psnr"], r["ssim"], r["consistency"]]).all() for r in validations)
    assert [r["step"] for r in _records(out, "checkpoint")] == [2, 4]
    assert sorted(p.name for p in out.iterdir()) == ["log.jsonl", "model", "state.pt"]


def test_the_conditioning_resampler_is_trained_with_and_saved(images, tmp_path, monkeypatch):
    seen = []
    real_condition = data.condition
    monkeypatch.setattr(data, "condition", lambda *args, **kwargs: seen.append(kwargs) or real_condition(*args, **kwargs))
    out = tmp_path / "run"
    assert train.main(["--data", str(images), "--out", str(out), "--steps", "1", "--resampler", "pil-bicubic",
                       *TINY]) == 0
    assert seen and all(kwargs["resampler"] == "pil-bicubic" for kwargs in seen)
    spec = model_dir.read_spec(out / checkpoint.MODEL_DIR)
    assert spec.resampler == "pil-bicubic" and spec.train_schedule == sr3.ScheduleConfig("linear", 2000, 1e-6, 1e-2)
    assert sr3.SR3Engine.from_pretrained(out / checkpoint.MODEL_DIR).resampler == "pil-bicubic"


def test_fine_tuning_to_another_prediction_target_and_space_starts_from_the_given_weights(images, tmp_path,
                                                                                         monkeypatch):
    first = tmp_path / "eps"
    assert train.main(["--data", str(images), "--out", str(first), "--steps", "1", *TINY]) == 0
    start = load_file(str(first / checkpoint.MODEL_DIR / "model.safetensors"))
    seen = []
    real_build_run = train.build_run
    monkeypatch.setattr(train, "build_run", lambda *a, **k: seen.append(a[-1]) or real_build_run(*a, **k))
    out = tmp_path / "v"
    assert train.main(["--data", str(images), "--out", str(out), "--steps", "2", "--prediction", "v",
                       "--residual-scale", "4", "--init-from", str(first / checkpoint.MODEL_DIR), *TINY]) == 0
    assert seen and all(torch.equal(seen[0][name], start[name]) for name in start)
    spec = model_dir.read_spec(out / checkpoint.MODEL_DIR)
    assert spec.model.prediction == "v" and spec.model.residual_scale == 4.0
    engine = sr3.SR3Engine.from_pretrained(out / checkpoint.MODEL_DIR)
    assert engine.prediction == "v" and engine.residual_scale == 4.0
    assert _load(out)["args"]["init_from"] == str(first / checkpoint.MODEL_DIR)


def test_init_from_a_model_of_another_architecture_is_refused(images, tmp_path, capsys):
    first = tmp_path / "tiny"
    assert train.main(["--data", str(images), "--out", str(first), "--steps", "1", *TINY]) == 0
    capsys.readouterr()
    args = [*TINY, "--data", str(images), "--out", str(tmp_path / "out"), "--steps", "1",
            "--init-from", str(first / checkpoint.MODEL_DIR), "--config", "sr3-16-128"]
    assert train.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: --init-from: ") and "not --config's" in err[-1]


def test_init_from_weights_that_do_not_fit_the_network_is_refused_before_it_is_built(images, tmp_path, capsys,
                                                                                      monkeypatch):
    # --config and the directory's config.json agree on a network 100000 channels wide (160 GB of
    # float32 weights); its model.safetensors holds tiny's.
    wide = sr3.UNetConfig.from_dict({**sr3.UNetConfig.named("tiny").to_dict(), "inner_channels": 100_000})
    (tmp_path / "wide.json").write_text(json.dumps(wide.to_dict()))
    spec = model_dir.ModelSpec(wide, sr3.ScheduleConfig("linear", 8, 1e-4, 0.1), sr3.SamplerConfig(), 4)
    model_dir.write(tmp_path / "init", sr3.SR3UNet(sr3.UNetConfig.named("tiny")).state_dict(), spec)
    monkeypatch.setattr(train, "build_run", lambda *args: pytest.fail("the network was built"))
    assert train.main([*TINY, "--config", str(tmp_path / "wide.json"), "--data", str(images), "--steps", "1",
                       "--out", str(tmp_path / "out"), "--init-from", str(tmp_path / "init")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: --init-from: {tmp_path / 'init' / 'model.safetensors'}: does not match "
                              "config.json (noise_level_mlp.1.weight is [64, 16], not [400000, 100000]; ")
    assert len(err[-1]) < 300

@pytest.mark.parametrize("workers", [0, 2])
def test_killed_and_resumed_run_ends_bit_identical(images, tmp_path, workers):
    # Dropout and blur make every source of randomness count. The op backend is named: with `auto`
    # the reference and the killed run would each time the backends and could pick different ones.
    config = tmp_path / "tiny-dropout.json"
    config.write_text(json.dumps({**sr3.UNetConfig.named("tiny").to_dict(), "dropout": 0.1}))
    args = ["--data", str(images), *TINY, "--config", str(config), "--steps", "6", "--save-every", "3",
            "--blur-sigma", "1.0", "--lr-decay-steps", "4", "--num-workers", str(workers), "--op-backend", "native"]
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    # Every run in a fresh process, as a restarted run is: DataLoader workers forked from this
    # test process would carry whatever earlier tests loaded into it (OpenVINO's thread pool
    # has crashed them).
    done = _cli([*args, "--out", str(reference)])
    assert done.returncode == 0, done.stderr

    killed = _cli([*args, "--out", str(resumed)], env={KILL_AFTER_SAVE_ENV: "1"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert _load(resumed)["step"] == 3
    done = _cli(["--out", str(resumed), "--resume"])
    assert done.returncode == 0, done.stderr

    assert _load(resumed)["step"] == 6
    assert _states_equal(_load(reference), _load(resumed)) == []
    assert ([r["loss"] for r in _records(reference, "train")] == [r["loss"] for r in _records(resumed, "train")])


def test_auto_trains_on_the_fastest_measured_op_backend_and_resumes_on_it(images, tmp_path, monkeypatch, capsys):
    from sr3_engine.training import trainer

    measured = {"cpp": 2.0, "native": 1.5}
    monkeypatch.setattr(trainer, "time_training_pass", lambda args, model, schedule, device, backend: measured[backend])
    out = tmp_path / "run"
    assert train.main(["--data", str(images), "--out", str(out), "--steps", "2", *TINY]) == 0
    assert "--op-backend auto picked native (a training pass took cpp 2 s, native 1.5 s)" in capsys.readouterr().err
    assert _load(out)["args"]["op_backend_used"] == "native"
    measured.update(native=3.0)  # a resume keeps the recorded pick whatever it would measure now
    assert train.main(["--out", str(out), "--resume", "--steps", "3"]) == 0
    assert _load(out)["args"]["op_backend_used"] == "native" and "picked" not in capsys.readouterr().err


def test_a_training_pass_is_timed_without_touching_the_run(images):
    from sr3_engine.training import trainer

    torch.manual_seed(3)
    model = sr3.SR3UNet(sr3.UNetConfig.named("tiny"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = train.build_parser().parse_args(["--out", "unused", *TINY])
    rng = torch.get_rng_state()
    seconds = trainer.time_training_pass(args, model, sr3.NoiseSchedule.linear(20), torch.device("cpu"), "native")
    assert seconds > 0 and torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_the_learning_rate_warms_up_then_follows_a_half_cosine_to_zero(images, tmp_path):
    out = tmp_path / "run"
    assert train.main(["--data", str(images), "--out", str(out), "--steps", "7", *TINY, "--lr", "1e-3",
                       "--lr-decay-steps", "4"]) == 0
    # Step s (from 1) runs at lr * factor(s - 1): warm-up (k + 1) / 2 for k < 2, then
    # (1 + cos(pi (k - 2) / 4)) / 2, which stays 0 after the decay ends.
    expected = [0.5, 1.0, 1.0, (1 + np.cos(np.pi / 4)) / 2, 0.5, (1 + np.cos(3 * np.pi / 4)) / 2, 0.0]
    np.testing.assert_allclose([r["lr"] for r in _records(out, "train")], 1e-3 * np.array(expected), atol=1e-12)


def test_resume_extends_a_run_and_refuses_to_change_it(images, tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(["--data", str(images), "--out", str(out), "--steps", "2", *TINY]) == 0
    assert train.main(["--data", str(images), "--out", str(out), "--steps", "2", *TINY]) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert train.main(["--out", str(out), "--resume", "--lr", "1e-3", "--steps", "3"]) == 2
    assert "--lr differ from the saved run" in capsys.readouterr().err
    assert train.main(["--out", str(out), "--resume", "--steps", "3"]) == 0
    assert _load(out)["step"] == 3
    _gradient_image(6).save(images / "6.png")
    assert train.main(["--out", str(out), "--resume", "--steps", "4"]) == 0
    assert "changed since the checkpoint" in capsys.readouterr().err
    assert [r["step"] for r in _records(out, "train")] == [1, 2, 3, 4]


def test_resume_from_a_corrupt_state_names_the_file(images, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / checkpoint.STATE_FILE).write_bytes(b"not a checkpoint")
    assert train.main(["--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(out / checkpoint.STATE_FILE) in err


def test_two_processes_with_gloo_keep_identical_replicas(images, tmp_path):
    out = tmp_path / "ddp"
    result = _cli(["--nproc_per_node", "2", "--standalone", "-m", "sr3_engine.train", "--data", str(images),
                   "--out", str(out), "--device", "cpu", "--steps", "3", "--save-every", "2", *TINY],
                  module=["-m", "torch.distributed.run"])
    assert result.returncode == 0, result.stderr[-3000:]
    (done,) = _records(out, "done")
    assert len(done["weights_sha256"]) == 2 and len(set(done["weights_sha256"])) == 1
    digest = hashlib.sha256()
    for tensor in _load(out)["model"].values():
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    assert digest.hexdigest() == done["weights_sha256"][0], "rank 0 must save the weights both ranks hold"
    engine = sr3.SR3Engine.from_pretrained(out / checkpoint.MODEL_DIR)
    assert all(torch.isfinite(p).all() for p in engine.model.parameters())
    assert [r["step"] for r in _records(out, "checkpoint")] == [2, 3]


@pytest.mark.parametrize("make_args, message", [
    (lambda tmp, img: ["--data", str(tmp / "missing")], "missing: not a directory"),
    (lambda tmp, img: ["--data", str(tmp / "empty")], "empty: no images found"),
    (lambda tmp, img: ["--data", str(img), "--config", "huge"], "--config 'huge': not a named config"),
    (lambda tmp, img: ["--data", str(img), "--hr-size", "30"], "not divisible by --scale"),
    (lambda tmp, img: ["--data", str(img), "--hr-size", "64"], "no image is at least 64x64"),
])
def test_bad_arguments_give_one_line_and_exit_code_2(images, tmp_path, capsys, make_args, message):
    (tmp_path / "empty").mkdir()
    args = [*TINY, *make_args(tmp_path, images), "--out", str(tmp_path / "out"), "--steps", "1"]
    assert train.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1]
    assert not (tmp_path / "out" / checkpoint.STATE_FILE).exists()


def test_the_command_line_exits_with_code_2(tmp_path):
    result = _cli(["--data", str(tmp_path / "missing"), "--out", str(tmp_path / "out"), "--config", "tiny"])
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {tmp_path / 'missing'}: not a directory"


def test_ranks_split_every_step_and_each_epoch_visits_every_image():
    samplers = [iter(data.StreamBatchSampler(5, 3, seed=1, rank=r, world_size=2)) for r in range(2)]
    steps = [[next(s) for s in samplers] for _ in range(5)]
    positions = [p for step in steps for batch in step for p, _ in batch]
    assert sorted(positions) == list(range(30))
    stream = dict(p_i for step in steps for batch in step for p_i in batch)
    for epoch in range(6):
        assert sorted(stream[p] for p in range(epoch * 5, epoch * 5 + 5)) == list(range(5))
    resumed = next(iter(data.StreamBatchSampler(5, 3, seed=1, rank=1, world_size=2, start_position=12)))
    assert resumed == steps[2][1]


def test_samples_depend_only_on_their_key(images):
    paths = data.usable_images(images, 32)
    dataset = data.CropDataset(paths, 32, 4, seed=5, blur_sigma=2.0)
    x_up, y0 = dataset[(11, 2)]
    assert torch.equal(x_up, dataset[(11, 2)][0]) and torch.equal(y0, dataset[(11, 2)][1])
    assert not torch.equal(y0, dataset[(12, 2)][1])
    assert x_up.shape == y0.shape == (3, 32, 32) and -1.0 <= float(x_up.min()) and float(x_up.max()) <= 1.0


def test_an_image_that_fails_to_decode_is_replaced_by_the_next(images, tmp_path, capsys):
    buffer = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buffer, format="PNG")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(buffer.getvalue()[:len(buffer.getvalue()) // 2])  # the header parses, the pixels do not
    dataset = data.CropDataset([truncated, images / "1.png"], 32, 4, seed=0)
    x_up, y0 = dataset[(0, 0)]
    assert torch.isfinite(x_up).all() and y0.shape == (3, 32, 32)
    err = capsys.readouterr().err
    assert str(truncated) in err and "truncated" in err and "using the next image" in err


def test_gaussian_blur_keeps_constant_images_and_mass():
    flat = torch.full((1, 3, 5, 7), 0.3)
    assert torch.allclose(data.gaussian_blur(flat, 2.5), flat, atol=1e-6)
    spike = torch.zeros(1, 1, 21, 21)
    spike[..., 10, 10] = 1.0
    blurred = data.gaussian_blur(spike, 1.0)
    assert blurred.sum().item() == pytest.approx(1.0, abs=1e-6) and blurred.max().item() < 0.2


def test_a_resumed_run_sweeps_the_temporaries_a_killed_one_left(images, tmp_path):
    out = tmp_path / "run"
    assert train.main(["--data", str(images), "--out", str(out), "--steps", "1", *TINY]) == 0
    (out / ".state.pt.0123abcd.tmp").write_bytes(b"half a state")
    (out / ".log.jsonl.89abcdef.tmp").write_bytes(b"")
    assert train.main(["--out", str(out), "--resume", "--steps", "2"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["log.jsonl", "model", "state.pt"]


def test_file_names_that_are_not_utf8_are_fingerprinted_and_printed(images, capsys):
    try:
        _gradient_image(9, size=16).save(images / os.fsdecode(b"caf\xe9.png"))
    except (OSError, UnicodeError):
        pytest.skip("this file system takes only UTF-8 names")
    paths = data.usable_images(images, 32)
    assert "skipped 2 image(s)" in capsys.readouterr().err  # capsys fails on a surrogate, as a UTF-8 terminal does
    assert len(data.fingerprint(images, [*paths, images / os.fsdecode(b"caf\xe9.png")])) == 64
    # Names that are UTF-8 keep the fingerprint that earlier checkpoints saved.
    assert data.fingerprint(images, [images / "sub" / "4.png"]) == hashlib.sha256(b"sub/4.png\n").hexdigest()


def test_a_multi_page_training_image_is_noted_once(tmp_path, capsys):
    path = tmp_path / "pages.tif"
    _gradient_image(0).save(path, save_all=True, append_images=[_gradient_image(1)])
    dataset = data.CropDataset([path], 32, 4, seed=0)
    for sample_id in range(3):
        dataset[(sample_id, 0)]
    assert capsys.readouterr().err == (f"sr3_engine: warning: {path}: has 2 frames (a multi-page or animated image); "
                                       "only the first is used\n")
