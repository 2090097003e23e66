"""`python -m sr3_engine convert`: checkpoints in the layout of the most used open SR3 implementation.

The checkpoints here are built the way that implementation saves them: the U-Net's state_dict
under `denoise_fn.`, twelve float32 schedule buffers computed as its code defines them (written
out again below from its definitions, not taken from sr3_engine), `module.` for DataParallel,
and a JSON config with // comments.
"""

import argparse
import copy
import json
import math
import re
import zipfile

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import sr3_engine as sr3
from sr3_engine.cli import main
from sr3_engine.runtime import convert, model_dir

UNET = sr3.UNetConfig(inner_channels=16, channel_mults=(1, 2, 2), res_blocks=1, attn_resolutions=(8,),
                      norm_groups=8, image_size=32)
STEPS = 200


def their_betas(schedule: str, n: int, start: float = 1e-6, end: float = 1e-2) -> np.ndarray:
    """make_beta_schedule of that implementation, in float64."""
    if schedule == "linear":
        return np.linspace(start, end, n, dtype=np.float64)
    if schedule == "quad":
        return np.linspace(start**0.5, end**0.5, n, dtype=np.float64) ** 2
    if schedule in ("warmup10", "warmup50"):
        betas = end * np.ones(n, dtype=np.float64)
        warm = int(n * (0.1 if schedule == "warmup10" else 0.5))
        betas[:warm] = np.linspace(start, end, warm, dtype=np.float64)
        return betas
    if schedule == "const":
        return end * np.ones(n, dtype=np.float64)
    if schedule == "jsd":
        return 1.0 / np.linspace(n, 1, n)
    if schedule == "cosine":
        steps = torch.arange(n + 1, dtype=torch.float64) / n + 8e-3
        alphas = torch.cos(steps / (1 + 8e-3) * math.pi / 2).pow(2)
        alphas = alphas / alphas[0]
        return (1 - alphas[1:] / alphas[:-1]).clamp(max=0.999).numpy()
    raise ValueError(schedule)


def their_buffers(betas: np.ndarray) -> dict[str, torch.Tensor]:
    """set_new_noise_schedule of that implementation: numpy float64, stored as float32 tensors."""
    alphas = 1.0 - betas
    alphas_cumprod = np.cumprod(alphas, axis=0)
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    values = {
        "betas": betas, "alphas_cumprod": alphas_cumprod, "alphas_cumprod_prev": alphas_cumprod_prev,
        "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod), "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - alphas_cumprod),
        "log_one_minus_alphas_cumprod": np.log(1.0 - alphas_cumprod),
        "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod - 1), "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": np.log(np.maximum(posterior_variance, 1e-20)),
        "posterior_mean_coef1": betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
        "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod),
    }
    return {name: torch.tensor(value, dtype=torch.float32) for name, value in values.items()}


CONFIG_TEXT = """{
    "name": "sr_test", // a run of theirs
    "path": {"log": "http://example.org/logs", "note": "a \\"quoted\\" // stays"}, // a // inside a string stays
    "datasets": {
        "train": {"l_resolution": 8, "r_resolution": 32, "dataroot": "dataset/ffhq_8_32"},
        "val": {"l_resolution": 8, "r_resolution": 32}
    },
    "model": {
        "which_model_G": "%(which)s", // use the ddpm or sr3 network structure
        "unet": {"in_channel": 6, "out_channel": 3, "inner_channel": 16, "norm_groups": 8,
                 "channel_multiplier": [1, 2, 2], "attn_res": [8], "res_blocks": 1, "dropout": 0.2},
        "beta_schedule": {
            "train": {"schedule": "%(schedule)s", "n_timestep": %(steps)d, "linear_start": 1e-6, "linear_end": 1e-2},
            "val": {"schedule": "%(schedule)s", "n_timestep": %(steps)d, "linear_start": 1e-6, "linear_end": 1e-2}
        },
        "diffusion": {"image_size": 32, "channels": 3, "conditional": true}
    }
}
"""


@pytest.fixture(scope="module")
def original():
    torch.manual_seed(7)
    return sr3.SR3UNet(UNET).eval()


def _their_files(tmp_path, model, *, schedule="linear", which="sr3", data_parallel=False, buffers_from=None):
    state = {f"denoise_fn.{k}": v.clone() for k, v in model.state_dict().items()}
    state.update(their_buffers(buffers_from if buffers_from is not None else their_betas(schedule, STEPS)))
    if data_parallel:
        state = {f"module.{k}": v for k, v in state.items()}
    checkpoint = tmp_path / "I1000_E3_gen.pth"
    torch.save(state, checkpoint)
    config = tmp_path / "sr_sr3_8_32.json"
    config.write_text(CONFIG_TEXT % {"which": which, "schedule": schedule, "steps": STEPS})
    return checkpoint, config


@pytest.mark.parametrize("data_parallel", [False, True], ids=["plain", "dataparallel"])
def test_converted_weights_are_bit_identical_and_sample_the_same(tmp_path, original, data_parallel):
    checkpoint, config = _their_files(tmp_path, original, data_parallel=data_parallel)
    assert main(["convert", str(checkpoint), "--config", str(config), "--out", str(tmp_path / "out")]) == 0
    saved = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert saved.keys() == original.state_dict().keys()
    assert all(torch.equal(saved[k], v) for k, v in original.state_dict().items())

    spec = model_dir.read_spec(tmp_path / "out")
    assert spec.model == UNET.__class__(**{**UNET.to_dict(), "dropout": 0.2, "channel_mults": (1, 2, 2),
                                           "attn_resolutions": (8,)})
    assert (spec.scale, spec.resampler) == (4, "pil-bicubic")
    assert spec.train_schedule == sr3.ScheduleConfig("linear", STEPS, 1e-6, 1e-2)
    assert spec.schedule == sr3.ScheduleConfig("linear", STEPS, 1e-6, 1e-2, respace=100)

    converted = sr3.SR3Engine.from_pretrained(tmp_path / "out", progress=False)
    reference = sr3.SR3Engine(copy.deepcopy(original), sr3.NoiseSchedule.linear(STEPS, 1e-6, 1e-2).respaced(100),
                              scale=4, resampler="pil-bicubic", progress=False)
    lr = torch.rand(2, 3, 8, 12)
    for seed in (0, 1):
        torch.testing.assert_close(converted.sample(lr, generator=torch.Generator().manual_seed(seed)),
                                   reference.sample(lr, generator=torch.Generator().manual_seed(seed)),
                                   rtol=0, atol=0)


def test_comments_go_and_strings_stay():
    text = convert.strip_comments(CONFIG_TEXT % {"which": "sr3", "schedule": "linear", "steps": 5})
    assert json.loads(text)["path"] == {"log": "http://example.org/logs", "note": 'a "quoted" // stays'}


def test_the_condition_is_pils_bicubic_on_8_bit_levels():
    from PIL import Image

    lr = (torch.rand(1, 3, 6, 9) * 255).round() / 255
    image = Image.fromarray((lr[0].permute(1, 2, 0) * 255).round().byte().numpy()).resize((36, 24), Image.BICUBIC)
    expected = torch.from_numpy(np.array(image)).permute(2, 0, 1).float()[None] / 255 * 2 - 1
    torch.testing.assert_close(sr3.condition(lr, 4, resampler="pil-bicubic"), expected, rtol=0, atol=1e-6)
    assert (sr3.condition(lr, 4, resampler="pil-bicubic") - sr3.condition(lr, 4)).abs().max() > 0.01


@pytest.mark.parametrize("schedule", ["linear", "quad", "const", "cosine", "warmup10", "warmup50"])
def test_every_schedule_of_theirs_maps_to_the_same_betas(tmp_path, original, schedule):
    checkpoint, config = _their_files(tmp_path, original, schedule=schedule)
    assert main(["convert", str(checkpoint), "--config", str(config), "--out", str(tmp_path / "out")]) == 0
    train = model_dir.read_spec(tmp_path / "out").train_schedule
    np.testing.assert_allclose(sr3.NoiseSchedule.from_config(train).betas, their_betas(schedule, STEPS),
                               rtol=1e-12, atol=1e-15)


def test_without_a_config_the_shapes_give_the_architecture(tmp_path, original, capsys):
    checkpoint, _ = _their_files(tmp_path, original)
    out = tmp_path / "out"
    assert main(["convert", str(checkpoint), "--out", str(out), "--scale", "4"]) == 2
    err = capsys.readouterr().err
    assert "--image-size" in err and "--norm-groups" in err and err.count("\n") == 1 and not out.exists()
    assert main(["convert", str(checkpoint), "--out", str(out), "--scale", "4", "--image-size", "32",
                 "--norm-groups", "8"]) == 0
    spec = model_dir.read_spec(out)
    assert spec.model == UNET and spec.train_schedule == sr3.ScheduleConfig("linear", STEPS, 1e-6, 1e-2)
    assert "inferred" in capsys.readouterr().err


@pytest.mark.parametrize("breakage, message", [
    ("opt", "an optimizer state (_opt.pth); convert the matching _gen.pth"),
    ("ddpm", "model.which_model_G: 'ddpm' is not the SR3 network"),
    ("jsd", "model.beta_schedule.train.schedule: 'jsd' cannot be mapped"),
    ("mismatch", "the schedule buffers do not match"),
    ("pickle", "holds more than tensors"),
    ("wrong weights", "does not fit"),
])
def test_refusals_name_the_file_and_write_nothing(tmp_path, original, capsys, breakage, message):
    checkpoint, config = _their_files(tmp_path, original, which="ddpm" if breakage == "ddpm" else "sr3",
                                      schedule="jsd" if breakage == "jsd" else "linear",
                                      buffers_from=their_betas("linear", STEPS, 1e-4, 2e-2)
                                      if breakage == "mismatch" else None)
    if breakage == "opt":
        checkpoint = checkpoint.with_name("I1000_E3_opt.pth")
        torch.save({"epoch": 3, "iter": 1000, "optimizer": {}, "scheduler": None}, checkpoint)
    elif breakage == "pickle":
        torch.save({"denoise_fn.downs.0.weight": torch.zeros(1), "args": argparse.Namespace(lr=1e-4)}, checkpoint)
    elif breakage == "wrong weights":
        torch.save({f"denoise_fn.{k}": v[..., :1] if v.dim() > 1 else v
                    for k, v in original.state_dict().items()}, checkpoint)
    out = tmp_path / "out"
    assert main(["convert", str(checkpoint), "--config", str(config), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_a_config_asking_for_another_network_is_refused_before_it_is_built(tmp_path, original, capsys, monkeypatch):
    checkpoint, config = _their_files(tmp_path, original)
    config.write_text(config.read_text().replace('"inner_channel": 16', '"inner_channel": 100000'))
    real = sr3.SR3UNet

    def only_on_meta(unet):
        assert torch.get_default_device().type == "meta", "a 160 GB network was allocated before the check"
        return real(unet)

    monkeypatch.setattr(convert, "SR3UNet", only_on_meta)
    monkeypatch.setattr(model_dir, "SR3UNet", only_on_meta)
    out = tmp_path / "out"
    assert main(["convert", str(checkpoint), "--config", str(config), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {checkpoint}: does not fit the config's network (noise_level_mlp.1.weight is "
                          "[64, 16], not [400000, 100000]; ")
    assert re.search(r"; and [\d,]+ more differences\)\n$", err) and err.count("\n") == 1 and len(err) < 300
    assert not out.exists()


def test_a_compressed_checkpoint_is_refused_rather_than_inflated(tmp_path, original, capsys):
    checkpoint, config = _their_files(tmp_path, original)
    packed = tmp_path / "I1000_E3_packed_gen.pth"
    with zipfile.ZipFile(checkpoint) as source, zipfile.ZipFile(packed, "w", zipfile.ZIP_DEFLATED) as target:
        for info in source.infolist():
            target.writestr(info.filename, source.read(info.filename))
    # torch.load itself inflates it: the refusal is convert's.
    assert torch.load(packed, weights_only=True).keys() == torch.load(checkpoint, weights_only=True).keys()
    assert main(["convert", str(packed), "--config", str(config), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == (f"error: {packed}: holds compressed records, which torch.save never writes; "
                                       "refused rather than inflated\n")
    assert not (tmp_path / "out").exists()

def test_loading_a_pth_says_how_to_convert_it(tmp_path, original):
    checkpoint, _ = _their_files(tmp_path, original)
    with pytest.raises(ValueError, match=f"convert it first: python -m sr3_engine convert {checkpoint} --config "):
        sr3.SR3Engine.from_pretrained(checkpoint)


def test_the_unet_runs_in_float64_on_the_native_ops(original):
    # A float64 reference of a converted model: the noise embedding follows the input's dtype.
    model = copy.deepcopy(original).double()
    sr3.set_op_backend(model, "native")
    x, y, level = torch.rand(1, 3, 16, 16), torch.randn(1, 3, 16, 16), torch.rand(1)
    with torch.no_grad():
        eps64 = model(x.double(), y.double(), level.double())
        eps32 = original(x, y, level)
    assert eps64.dtype == torch.float64
    torch.testing.assert_close(eps32.double(), eps64, rtol=1e-4, atol=1e-4)
