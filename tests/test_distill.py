"""Progressive distillation: the student's target against the paper's equations and an oracle
teacher, the loss on a tiny model, the distill command's rounds and exact resume, and a
distilled model served on every backend the CPU has and through tiles."""

import copy
import dataclasses
import importlib.util
import json
import os
import shutil
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
from sr3_engine import distillation
from sr3_engine.cli import distill, train
from sr3_engine.runtime import model_dir
from sr3_engine.serving.scheduler import Scheduler, SchedulerConfig
from sr3_engine.training import checkpoint
from sr3_engine.training.trainer import KILL_AFTER_SAVE_ENV

from .conftest import oracle_denoiser

REPO = Path(__file__).resolve().parents[1]
SCHEDULE = sr3.NoiseSchedule.linear(16, 1e-3, 0.2)
TINY_DISTILL = ["--hr-size", "32", "--batch-size", "2", "--log-every", "1", "--warmup-steps", "1", "--seed", "3",
                "--op-backend", "native"]


# Training processes here (in-process and child) use one thread each (conftest.one_torch_thread).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _paper_two_steps_target(teacher, x_up, z, level_t, level_mid, level_end, prediction, clip):
    """Salimans and Ho 2022, alg. 2, written out in float64 for one level per batch: two DDIM
    steps of the teacher from z_t (t -> t' -> t''), then x~ and the target in `prediction`."""
    z = z.double()
    alpha = {name: torch.tensor(level, dtype=torch.float64) for name, level in
             (("t", level_t), ("mid", level_mid), ("end", level_end))}
    sigma = {name: torch.sqrt(1.0 - a * a) for name, a in alpha.items()}

    def x_hat(z_s, name):
        f = teacher(x_up, z_s.float(), torch.full((z.shape[0],), alpha[name].item())).double()
        a, s = alpha[name], sigma[name]
        x = {"eps": (z_s - s * f) / a, "y0": f, "v": a * z_s - s * f}[prediction]
        return x.clamp(-1.0, 1.0) if clip else x

    def ddim(z_s, x, start, stop):
        return alpha[stop] * x + sigma[stop] / sigma[start] * (z_s - alpha[start] * x)

    z_mid = ddim(z, x_hat(z, "t"), "t", "mid")
    z_end = ddim(z_mid, x_hat(z_mid, "mid"), "mid", "end")
    if sigma["end"] == 0:
        x_tilde = z_end
    else:
        ratio = sigma["end"] / sigma["t"]
        x_tilde = (z_end - ratio * z) / (alpha["end"] - ratio * alpha["t"])
    eps_tilde = (z - alpha["t"] * x_tilde) / sigma["t"]
    return {"eps": eps_tilde, "y0": x_tilde, "v": alpha["t"] * eps_tilde - sigma["t"] * x_tilde}[prediction]


def _some_teacher(x_up, y_t, level):
    # Not a denoiser of anything: a fixed nonlinear map, so that the two steps are not trivially exact.
    return torch.tanh(0.7 * y_t + 0.3 * x_up) * (0.5 + level.view(-1, 1, 1, 1))


@pytest.mark.parametrize("prediction", ["eps", "y0", "v"])
@pytest.mark.parametrize("residual_scale", [None, 4.0])
def test_the_students_target_is_the_papers(prediction, residual_scale):
    steps = 4
    plans = distillation.distillation_plans(SCHEDULE, steps, prediction, residual_scale)
    teacher_levels = np.concatenate([plans.teacher.noise_level, [1.0]])
    generator = torch.Generator().manual_seed(5)
    x_up = torch.rand(2, 3, 8, 8, generator=generator) * 2 - 1
    for i in range(steps):
        z = torch.randn(2, 3, 8, 8, generator=generator)
        index = torch.full((2,), i)
        z_end = distillation.teacher_two_steps(_some_teacher, x_up, z, index, plans)
        ours = distillation.student_target(plans, index, z, z_end)
        paper = _paper_two_steps_target(_some_teacher, x_up, z, *teacher_levels[2 * i:2 * i + 3], prediction,
                                        clip=residual_scale is None)
        torch.testing.assert_close(ours.double(), paper, rtol=1e-4, atol=1e-4, msg=f"student step {i}")


@pytest.mark.parametrize("prediction", ["eps", "y0", "v"])
def test_with_an_oracle_teacher_the_students_target_is_the_true_one(prediction):
    # Given the true y0, two DDIM steps stay on the line through z_t and y0, so the one-step
    # target is the true target of z_t: for every student step, the first (from pure noise) included.
    plans = distillation.distillation_plans(SCHEDULE, 4, prediction, None)
    generator = torch.Generator().manual_seed(1)
    y0 = torch.rand(8, 3, 8, 8, generator=generator) * 1.8 - 0.9
    teacher = oracle_denoiser(y0, prediction=prediction)
    steps = torch.arange(8) % 4
    z = torch.randn(8, 3, 8, 8, generator=generator)
    target = distillation.student_target(plans, steps, z, distillation.teacher_two_steps(teacher, y0, z, steps, plans))
    level = torch.as_tensor(plans.student.noise_level[steps.numpy()], dtype=torch.float64)
    eps = (z.double() - level.view(-1, 1, 1, 1) * y0.double()) / torch.sqrt(1 - level * level).view(-1, 1, 1, 1)
    expected = sr3.diffusion.prediction_target(prediction, y0.double(), eps, level)
    torch.testing.assert_close(target.double(), expected, rtol=1e-4, atol=2e-4)


@pytest.mark.parametrize("base, steps", [(16, 4), (10, 3), (100, 2), (1000, 125)])
def test_the_student_grid_is_every_other_teacher_level(base, steps):
    plans = distillation.distillation_plans(sr3.NoiseSchedule.linear(base, 1e-4, 0.02), steps, "v", None)
    assert plans.teacher.num_steps == 2 * steps and plans.student.num_steps == steps
    # Equal but for rounding: each respaced schedule recomputes its levels from its own betas.
    np.testing.assert_allclose(plans.student.noise_level, plans.teacher.noise_level[::2], rtol=1e-12)
    with pytest.raises(ValueError, match=f"at least {2 * base + 2} steps"):
        distillation.distillation_plans(sr3.NoiseSchedule.linear(base, 1e-4, 0.02), base + 1, "v", None)


def test_the_distillation_loss_falls_on_a_tiny_model():
    torch.manual_seed(0)
    config = dataclasses.replace(sr3.UNetConfig.named("tiny"), prediction="v", residual_scale=4.0)
    teacher = sr3.SR3UNet(config).eval().requires_grad_(False)
    student = copy.deepcopy(teacher).train().requires_grad_(True)
    plans = distillation.distillation_plans(SCHEDULE, 4, "v", 4.0)
    generator = torch.Generator().manual_seed(2)
    y0 = torch.rand(4, 3, 16, 16, generator=generator) * 2 - 1
    x_up = (y0 + 0.1 * torch.randn(y0.shape, generator=generator)).clamp(-1, 1)
    optimizer = torch.optim.Adam(student.parameters(), lr=2e-3)
    losses = []
    for step in range(40):
        loss = distillation.distillation_loss(student, x_up, y0, teacher=teacher, plans=plans,
                                              generator=torch.Generator().manual_seed(step % 4))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert np.mean(losses[-4:]) < 0.5 * np.mean(losses[:4]), losses


def _gradient_image(index: int, size: int = 48) -> Image.Image:
    y, x = np.mgrid[0:size, 0:size]
    rgb = np.stack([(x * 5 + index * 20) % 256, (y * 4 + index * 30) % 256, ((x + y) * 3 + index * 7) % 256], -1)
    return Image.fromarray(rgb.astype(np.uint8))


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    for i in range(4):
        _gradient_image(i).save(root / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def teacher_dir(images, tmp_path_factory) -> Path:
    """A tiny v model of the residual with an 8-step inference schedule (two training steps)."""
    out = tmp_path_factory.mktemp("teacher")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert train.main(["--data", str(images), "--out", str(out), "--steps", "2", "--config", "tiny",
                           "--scale", "4", "--sample-steps", "8", "--prediction", "v", "--residual-scale", "4",
                           *TINY_DISTILL]) == 0
    finally:
        torch.set_num_threads(threads)
    return out / checkpoint.MODEL_DIR


def _distill_args(teacher_dir: Path, images: Path, out: Path) -> list[str]:
    return ["--teacher", str(teacher_dir), "--data", str(images), "--out", str(out), "--steps", "2",
            "--round-steps", "3", "--save-every", "2", *TINY_DISTILL]


@pytest.fixture(scope="module")
def distilled(teacher_dir, images, tmp_path_factory) -> Path:
    """An uninterrupted distillation of the teacher, 8 -> 4 -> 2 steps, three optimiser steps a round."""
    out = tmp_path_factory.mktemp("distilled")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert distill.main(_distill_args(teacher_dir, images, out)) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def _load(path: Path) -> dict:
    return torch.load(path / checkpoint.STATE_FILE, weights_only=True)


def _losses(path: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (path / checkpoint.LOG_FILE).read_text().splitlines())
            if r["type"] == "train"]


def test_distill_runs_each_round_from_the_last_and_saves_the_plan_of_each(distilled, teacher_dir):
    assert sorted(p.name for p in distilled.iterdir()) == ["distill.json", "model", "round-1", "round-2"]
    teacher_spec = model_dir.read_spec(teacher_dir)
    for name, steps in (("round-1", 4), ("round-2", 2), ("model", 2)):
        directory = distilled / name / checkpoint.MODEL_DIR if name != "model" else distilled / name
        spec = model_dir.read_spec(directory)
        assert spec.sampler == sr3.SamplerConfig("ddim", eta=0.0)
        assert spec.schedule == dataclasses.replace(teacher_spec.schedule, respace=steps)
        assert spec.model == teacher_spec.model and spec.scale == 4
    for name in ("round-1", "round-2"):
        assert _load(distilled / name)["step"] == 3 and len(_losses(distilled / name)) == 3
    final = load_file(str(distilled / "model" / "model.safetensors"))
    second = _load(distilled / "round-2")["ema"]
    assert all(torch.equal(final[k], v) for k, v in second.items())
    # Each round starts from its teacher's weights: round 2's first EMA is not round 1's start.
    assert not all(torch.equal(a, b) for a, b in zip(_load(distilled / "round-1")["ema"].values(),
                                                     load_file(str(teacher_dir / "model.safetensors")).values()))


def _cli(args: list[str], env: dict[str, str], launcher: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **env}
    return subprocess.run([sys.executable, *launcher, "-m", "sr3_engine", "distill", *args], cwd=REPO,
                          env=environment, capture_output=True, text=True, timeout=240)


@pytest.mark.parametrize("kill_after", [1, 3])
def test_a_killed_distillation_resumes_bit_identical(distilled, teacher_dir, images, tmp_path, kill_after):
    # Checkpoints at steps 2 and 3 of each round: the first kill is inside round 1, the other inside round 2.
    out = tmp_path / "killed"
    killed = _cli(_distill_args(teacher_dir, images, out), env={KILL_AFTER_SAVE_ENV: str(kill_after)})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert distill.main(["--out", str(out), "--resume"]) == 0
    for name in ("round-1", "round-2"):
        reference, resumed = _load(distilled / name), _load(out / name)
        assert [k for part in ("model", "ema") for k in reference[part]
                if not torch.equal(reference[part][k], resumed[part][k])] == []
        assert _losses(distilled / name) == _losses(out / name)


@pytest.mark.slow
def test_two_processes_with_gloo_distil_identical_replicas(teacher_dir, images, tmp_path):
    out = tmp_path / "ddp"
    result = _cli([*_distill_args(teacher_dir, images, out), "--device", "cpu", "--steps", "4"], env={},
                  launcher=("-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone"))
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (out / "round-1" / checkpoint.LOG_FILE).read_text().splitlines()]
    (done,) = [r for r in records if r["type"] == "done"]
    assert len(done["weights_sha256"]) == 2 and len(set(done["weights_sha256"])) == 1
    assert model_dir.read_spec(out / "model").schedule.respace == 4


def test_resume_with_fewer_steps_adds_rounds_and_keeps_the_earlier_ones(distilled, tmp_path):
    out = tmp_path / "more"
    shutil.copytree(distilled, out)
    before = _load(out / "round-2")
    assert distill.main(["--out", str(out), "--resume", "--steps", "1"]) == 0
    assert all(torch.equal(before["ema"][k], v) for k, v in _load(out / "round-2")["ema"].items())
    assert model_dir.read_spec(out / "model").schedule.respace == 1
    assert _load(out / "round-3")["step"] == 3


@pytest.mark.parametrize("make_args, message", [
    (lambda t, i, o: ["--teacher", str(t), "--data", str(i), "--out", str(o), "--steps", "2", "--teacher-steps", "6"],
     "--teacher-steps must be --steps (2) times a power of two"),
    (lambda t, i, o: ["--teacher", str(t), "--data", str(i), "--out", str(o), "--steps", "8"],
     "fewer than two per student step"),
    (lambda t, i, o: ["--teacher", str(t), "--data", str(i), "--out", str(o), "--steps", "2", "--teacher-steps", "16"],
     "more than the teacher's schedule's 8 steps"),
    (lambda t, i, o: ["--teacher", str(o / "nothing"), "--data", str(i), "--out", str(o)], "--teacher: "),
    (lambda t, i, o: ["--out", str(o), "--resume"], "no distillation to resume"),
    (lambda t, i, o: ["--teacher", str(t), "--out", str(o)], "--data is required"),
])
def test_bad_arguments_give_one_line_and_exit_code_2(teacher_dir, images, tmp_path, capsys, make_args, message):
    assert distill.main([*make_args(teacher_dir, images, tmp_path / "out"), *TINY_DISTILL]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1], err


def test_a_finished_run_is_not_overwritten_nor_changed_on_resume(distilled, capsys):
    assert distill.main(["--teacher", "demo-x4", "--data", "x", "--out", str(distilled)]) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert distill.main(["--out", str(distilled), "--resume", "--lr", "1"]) == 2
    assert "--lr differ from the saved run" in capsys.readouterr().err


HAVE_ONNXRUNTIME = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxscript", "onnxruntime"))


@pytest.mark.parametrize("backend, options, tiles", [
    ("eager", {}, True), ("fused", {}, True),
    # Inductor's aot_eager stand-in compiles once per tile shape: the tiled run of compile is
    # run_steps around a TiledDenoiser like eager's, so whole images are enough here.
    ("compile", {"compiler": "aot_eager"}, False),
    pytest.param("onnxruntime", {}, True, marks=[
        pytest.mark.slow, pytest.mark.skipif(not HAVE_ONNXRUNTIME, reason="needs the export extra")]),
])
def test_a_distilled_model_samples_its_plan_by_default_on_every_backend(distilled, backend, options, tiles):
    lr = torch.rand(1, 3, 12, 10, generator=torch.Generator().manual_seed(0))
    model, _ = model_dir.load(distilled / "model")
    x_up = sr3.condition(lr, 4, model.config.size_multiple)
    # The residual v model's DDIM plan over two of the teacher's eight levels, by the public sample.
    schedule = sr3.NoiseSchedule.linear(8, 1e-4, 0.1).respaced(2)
    with torch.inference_mode():
        expected = sr3.sample(model, x_up, schedule, sr3.SamplerConfig("ddim"), generator=torch.Generator().manual_seed(1))
    expected = ((expected[..., :48, :40] + 1) / 2).clamp(0, 1)
    engine = sr3.SR3Engine.from_pretrained(distilled / "model", backend=backend, dtype=torch.float32,
                                           backend_options=options, progress=False)
    assert engine.sampler.name == "ddim" and engine.schedule.num_steps == 2
    steps = []
    whole = engine.sample(lr, generator=torch.Generator().manual_seed(1), callback=lambda i, n, y: steps.append(i))
    assert steps == [0, 1], "two network evaluations"
    torch.testing.assert_close(whole, expected, rtol=2e-4, atol=2e-4)
    if tiles:
        eager = sr3.SR3Engine.from_pretrained(distilled / "model", dtype=torch.float32, progress=False)
        tiled = engine.sample(lr, generator=torch.Generator().manual_seed(1), tile=24, tile_overlap=8)
        reference = eager.sample(lr, generator=torch.Generator().manual_seed(1), tile=24, tile_overlap=8)
        assert not torch.equal(reference, eager.sample(lr, generator=torch.Generator().manual_seed(1))), "tiled"
        torch.testing.assert_close(tiled, reference, rtol=2e-4, atol=2e-4)


def test_the_serving_scheduler_serves_a_distilled_model_as_it_is(distilled):
    engine = sr3.SR3Engine.from_pretrained(distilled / "model", dtype=torch.float32, progress=False)
    lr = torch.rand(3, 6, 6, generator=torch.Generator().manual_seed(2))  # x4 = 24: one tile of side 24
    with Scheduler(engine, SchedulerConfig(tile_sides=(24, 48))) as scheduler:
        served = scheduler.submit(lr, seed=7).result(60)
    assert served.tiles == 1
    expected = engine.sample(lr[None], generator=torch.Generator().manual_seed(7))[0]
    torch.testing.assert_close(served.image, expected, rtol=0, atol=1e-5)
