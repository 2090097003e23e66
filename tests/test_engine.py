"""SR3Engine: the public contract of docs/ARCHITECTURE.md ("The engine")."""

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import sr3_engine as sr3
from sr3_engine.io import to_rgb_or_rgba
from sr3_engine.runtime.backends import BackendUnavailableError, fused


def _engine(model, **kwargs):
    kwargs.setdefault("schedule", sr3.NoiseSchedule.linear(8, 1e-3, 0.2))
    kwargs.setdefault("scale", 2)
    kwargs.setdefault("progress", False)
    return sr3.SR3Engine(model, **kwargs)


def _seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def _skip_unless_available(op_backend, x):
    reason = None if op_backend == "auto" else sr3.ops.why_unavailable("group_norm_silu", op_backend, x)
    if reason is not None:
        pytest.skip(reason)


def test_sample_shape_range_and_determinism(tiny_model):
    engine = _engine(tiny_model, scale=4)
    lr = torch.rand(3, 3, 6, 5)
    hr = engine.sample(lr, generator=_seeded(0))
    assert hr.shape == (3, 3, 24, 20) and hr.dtype == torch.float32
    assert hr.min() >= 0 and hr.max() <= 1
    torch.testing.assert_close(hr, engine.sample(lr, generator=_seeded(0)), rtol=0, atol=0)
    assert not torch.equal(hr, engine.sample(lr, generator=_seeded(1)))


def test_the_engine_and_the_public_sample_are_one_path(tiny_model):
    engine = _engine(tiny_model, sampler=sr3.SamplerConfig("ddim", eta=0.5, strength=0.5))
    lr = torch.rand(2, 3, 4, 6)
    x_up = sr3.condition(lr, 2, tiny_model.config.size_multiple)
    with torch.inference_mode():
        y0 = sr3.sample(tiny_model, x_up, engine.schedule, engine.sampler, generator=_seeded(4))
    expected = ((y0[..., :8, :12] + 1) / 2).clamp(0, 1)
    torch.testing.assert_close(engine.sample(lr, generator=_seeded(4)), expected, rtol=0, atol=0)


def test_an_engine_is_not_changed_after_construction(tiny_model):
    engine = _engine(tiny_model)
    for name in ("schedule", "sampler", "scale", "device", "dtype", "model", "backend", "progress"):
        with pytest.raises(AttributeError):
            setattr(engine, name, None)
    lr = torch.rand(1, 3, 4, 4)
    ddim = engine.sample(lr, sampler="ddim", steps=4, generator=_seeded(1))
    assert engine.sampler == sr3.SamplerConfig() and engine.schedule.num_steps == 8
    torch.testing.assert_close(ddim, engine.sample(lr, sampler=sr3.SamplerConfig("ddim"),
                                                   schedule=engine.schedule.respaced(4), generator=_seeded(1)),
                               rtol=0, atol=0)


def test_sizes_the_network_cannot_take_are_padded_and_cropped(tiny_model):
    hr = _engine(tiny_model, scale=3).sample(torch.rand(1, 3, 5, 7), generator=_seeded())
    assert hr.shape == (1, 3, 15, 21)


def test_steps_respaces_the_schedule(tiny_model):
    engine = _engine(tiny_model)
    seen = []
    engine.sample(torch.rand(1, 3, 4, 4), steps=3, callback=lambda i, n, y: seen.append(n))
    assert seen == [3, 3, 3]


def test_any_module_with_the_signature_is_served():
    class Zero(nn.Module):
        def forward(self, x_up, y_t, noise_level):
            return torch.zeros_like(y_t)

    hr = _engine(Zero(), sampler="ddim").sample(torch.rand(2, 3, 3, 3), generator=_seeded())
    assert hr.shape == (2, 3, 6, 6)


def test_reduced_precision_engine_runs(tiny_model):
    hr = _engine(tiny_model, dtype=torch.bfloat16).sample(torch.rand(1, 3, 4, 4), generator=_seeded())
    assert hr.dtype == torch.float32 and torch.isfinite(hr).all()


def test_save_and_load_give_bit_identical_samples(tiny_model, tmp_path):
    engine = _engine(tiny_model, scale=4, sampler=sr3.SamplerConfig("ddim", eta=0.3))
    engine.save_pretrained(tmp_path / "model")
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["config.json", "model.safetensors"]
    document = json.loads((tmp_path / "model" / "config.json").read_text())
    assert document["scale"] == 4 and document["sampler"]["name"] == "ddim"
    loaded = sr3.SR3Engine.from_pretrained(tmp_path / "model", progress=False)
    assert loaded.scale == 4 and loaded.sampler == engine.sampler
    assert loaded.schedule.config == engine.schedule.config
    lr = torch.rand(2, 3, 4, 6)
    torch.testing.assert_close(loaded.sample(lr, generator=_seeded(3)), engine.sample(lr, generator=_seeded(3)),
                               rtol=0, atol=0)


def test_half_precision_weights_round_trip(tiny_model, tmp_path):
    _engine(tiny_model).save_pretrained(tmp_path, weights_dtype=torch.float16)
    loaded = sr3.SR3Engine.from_pretrained(tmp_path, progress=False)
    for name, value in tiny_model.state_dict().items():
        torch.testing.assert_close(loaded.model.state_dict()[name], value.half().float(), rtol=0, atol=0)


@pytest.mark.parametrize("breakage, message", [
    (lambda d: (d / "config.json").unlink(), "config.json: missing"),
    (lambda d: (d / "model.safetensors").unlink(), "model.safetensors: missing"),
    (lambda d: (d / "config.json").write_text("{not json"), "not valid JSON"),
    (lambda d: (d / "config.json").write_text('{"a": 1}'), "not an sr3_engine model config"),
    (lambda d: (d / "model.safetensors").write_bytes(b"\x00" * 64), "not a readable safetensors file"),
])
def test_broken_model_directories_get_a_one_line_error(tiny_model, tmp_path, breakage, message):
    _engine(tiny_model).save_pretrained(tmp_path)
    breakage(tmp_path)
    with pytest.raises((ValueError, FileNotFoundError), match=message) as info:
        sr3.SR3Engine.from_pretrained(tmp_path)
    assert "\n" not in str(info.value)


def test_a_missing_model_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a model directory"):
        sr3.SR3Engine.from_pretrained(tmp_path / "nowhere")


def test_only_sr3_models_can_be_saved(tmp_path):
    class Plain(nn.Module):
        def forward(self, x_up, y_t, level):
            return y_t

    with pytest.raises(TypeError, match="only SR3UNet"):
        _engine(Plain()).save_pretrained(tmp_path)


@pytest.mark.parametrize("bad, message", [
    (torch.rand(3, 4, 4).numpy(), "expected a torch.Tensor"),
    (torch.rand(3, 4, 4), r"expected shape \(B, 3, h, w\)"),
    (torch.rand(0, 3, 4, 4), "batch is empty"),
    (torch.rand(1, 4, 4, 4), "expected 3 \\(RGB\\) channels"),
    (torch.rand(1, 3, 0, 4), "at least 1x1"),
    (torch.randint(0, 255, (1, 3, 4, 4), dtype=torch.uint8), "floating point"),
    (torch.rand(1, 3, 4, 4) * 2, r"values in \[0, 1\]"),
    (torch.full((1, 3, 4, 4), float("nan")), "NaN"),
])
def test_bad_input_is_rejected_with_what_was_expected(tiny_model, bad, message):
    with pytest.raises(ValueError, match=message):
        _engine(tiny_model).sample(bad)


def test_engine_arguments_are_validated(tiny_model):
    with pytest.raises(ValueError, match="unknown engine backend"):
        _engine(tiny_model, backend="fast")
    with pytest.raises(ValueError, match="scale"):
        _engine(tiny_model, scale=0)
    with pytest.raises(ValueError, match="dtype"):
        _engine(tiny_model, dtype=torch.int8)


def test_a_named_backend_that_is_not_here_says_so(tiny_model):
    with pytest.raises(BackendUnavailableError, match="tensorrt"):
        _engine(tiny_model, backend="tensorrt")


@pytest.mark.parametrize("op_backend", ["native", "cpp"])
def test_fused_refuses_an_op_backend_its_graphs_cannot_reseed(tiny_model, op_backend):
    # Checked before anything touches the device, so this runs without a GPU.
    _skip_unless_available(op_backend, torch.zeros(1, 8, 1, 1))
    with pytest.raises(BackendUnavailableError, match=f"cannot capture op backend '{op_backend}'.*CUDA graph"):
        _engine(tiny_model, backend="fused", device="cuda", op_backend=op_backend)


def test_upscale_keeps_order_sizes_and_alpha(tiny_model):
    engine = _engine(tiny_model, scale=2)
    rgba = Image.new("RGBA", (5, 3), (10, 200, 30, 128))
    images = [Image.new("RGB", (4, 4), (255, 0, 0)), rgba, Image.new("L", (4, 4), 77)]
    out = engine.upscale(images, generator=_seeded())
    assert [im.size for im in out] == [(8, 8), (10, 6), (8, 8)]
    assert [im.mode for im in out] == ["RGB", "RGBA", "RGB"]
    assert out[1].getchannel("A").getextrema() == (128, 128)


def _modes() -> dict[str, Image.Image]:
    """One 5x6 image in each mode `load_image` hands over or converts from."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (6, 5, 3), dtype=np.uint8))
    alpha = Image.fromarray(rng.integers(1, 256, (6, 5), dtype=np.uint8))
    rgba = rgb.copy()
    rgba.putalpha(alpha)
    keyed = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    keyed.info["transparency"] = int(np.asarray(keyed)[0, 0])
    deep = rng.integers(0, 65536, (6, 5))
    return {
        "RGB": rgb, "RGBA": rgba, "L": rgb.convert("L"), "LA": Image.merge("LA", (rgb.convert("L"), alpha)),
        "P": keyed, "RGBa": rgba.convert("RGBa"), "CMYK": rgb.convert("CMYK"),
        "I;16": Image.fromarray(deep.astype(np.uint16)), "I": Image.fromarray(deep.astype(np.int32)),
        "F": Image.fromarray(rng.random((6, 5), dtype=np.float32)),
    }


@pytest.mark.parametrize("mode", list(_modes()))
def test_upscale_takes_every_mode_load_image_takes(tiny_model, mode):
    engine = _engine(tiny_model, scale=2)
    image = _modes()[mode]
    assert image.mode == mode
    expected = to_rgb_or_rgba(image)
    # With another image in the call: one image's mode must not fail or change the others.
    out, neighbour = engine.upscale([image, _modes()["RGB"]], generator=_seeded(), steps=2)
    assert neighbour.size == (10, 12) and neighbour.mode == "RGB"
    assert out.size == (10, 12) and out.mode == expected.mode
    reference = engine.upscale([expected.convert("RGB"), _modes()["RGB"]], generator=_seeded(), steps=2)[0]
    assert np.array_equal(np.asarray(out.convert("RGB")), np.asarray(reference))
    if expected.mode == "RGBA":
        alpha = expected.getchannel("A").resize((10, 12), Image.Resampling.BICUBIC)
        assert np.array_equal(np.asarray(out.getchannel("A")), np.asarray(alpha))


def test_weights_that_do_not_fit_the_config_name_the_file(tiny_model, tmp_path):
    _engine(tiny_model).save_pretrained(tmp_path)
    document = json.loads((tmp_path / "config.json").read_text())
    document["model"]["inner_channels"] = 32
    (tmp_path / "config.json").write_text(json.dumps(document))
    with pytest.raises(ValueError, match="model.safetensors: does not match config.json") as info:
        sr3.SR3Engine.from_pretrained(tmp_path)
    assert "\n" not in str(info.value)


def test_a_config_with_wrong_values_names_the_file(tiny_model, tmp_path):
    _engine(tiny_model).save_pretrained(tmp_path)
    document = json.loads((tmp_path / "config.json").read_text())
    document["model"]["norm_groups"] = 5
    (tmp_path / "config.json").write_text(json.dumps(document))
    with pytest.raises(ValueError, match="config.json: model: UNetConfig"):
        sr3.SR3Engine.from_pretrained(tmp_path)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-4), (torch.bfloat16, 1e-2)])
def test_fused_backend_on_cpu_matches_eager(tiny_model, dtype, tolerance):
    eager = _engine(copy.deepcopy(tiny_model), scale=4, dtype=dtype)
    fused = _engine(copy.deepcopy(tiny_model), scale=4, dtype=dtype, backend="fused",
                    backend_options={"max_graphs": 2})
    lr = torch.rand(2, 3, 5, 6)
    for _ in range(2):  # step 2 of the first call traces and freezes the model, the second call reuses that graph
        torch.testing.assert_close(fused.sample(lr, generator=_seeded(4)), eager.sample(lr, generator=_seeded(4)),
                                   rtol=tolerance, atol=tolerance)
    assert fused.backend.cached_graphs == 1
    for size in (4, 12):  # a graph per shape, at most max_graphs kept
        lr = torch.rand(1, 3, size, size)
        torch.testing.assert_close(fused.sample(lr, generator=_seeded(4)), eager.sample(lr, generator=_seeded(4)),
                                   rtol=tolerance, atol=tolerance)
    assert fused.backend.cached_graphs == 2


def test_fused_on_cpu_traces_a_shape_on_its_second_call_only(tiny_model, monkeypatch):
    # A one-step plan ("mean") would otherwise pay for a trace that costs more than the call.
    traced = _recording_freeze(monkeypatch)
    engine = _engine(copy.deepcopy(tiny_model), scale=4, backend="fused", sampler="mean")
    eager = _engine(copy.deepcopy(tiny_model), scale=4, sampler="mean")
    lr = torch.rand(1, 3, 5, 6)
    for calls in (1, 2, 3):
        torch.testing.assert_close(engine.sample(lr, generator=_seeded(calls)),
                                   eager.sample(lr, generator=_seeded(calls)), rtol=1e-4, atol=1e-4)
        assert len(traced) == (0 if calls == 1 else 1)


def test_fused_on_cpu_fits_a_full_resolution_feature_map_of_each_call_in_slice_bytes(tiny_model):
    # inner_channels x channel_mults[0] x height x width values of the engine's dtype per image, at least one.
    config = dataclasses.replace(tiny_model.config, inner_channels=32)
    for dtype, side, slice_bytes, images in [(torch.float32, 256, fused.DEFAULT_SLICE_BYTES, 1),
                                             (torch.float32, 64, fused.DEFAULT_SLICE_BYTES, 8),
                                             (torch.bfloat16, 64, fused.DEFAULT_SLICE_BYTES, 16),
                                             (torch.float32, 64, 32 * 64 * 64 * 4 * 3 - 1, 2),
                                             (torch.float32, 1024, 1, 1)]:
        backend = fused.FusedBackend(sr3.SR3UNet(config), torch.device("cpu"), dtype, slice_bytes=slice_bytes)
        assert backend.images_per_call(side, side) == images
    wide_first_level = dataclasses.replace(config, channel_mults=(2, 2, 2))
    backend = fused.FusedBackend(sr3.SR3UNet(wide_first_level), torch.device("cpu"), torch.float32)
    assert backend.images_per_call(64, 64) == 4
    whole = fused.FusedBackend(sr3.SR3UNet(config), torch.device("cpu"), torch.float32, slice_bytes=None)
    assert whole.images_per_call(1024, 1024) is None
    unknown = fused.FusedBackend(nn.Conv2d(6, 3, 1), torch.device("cpu"), torch.float32)
    assert unknown.images_per_call(1024, 1024) is None


@pytest.mark.parametrize("slice_bytes", [0, -1, 1.5, True, "4MiB"])
def test_fused_refuses_a_slice_bytes_that_is_not_a_positive_int(tiny_model, slice_bytes):
    with pytest.raises(ValueError, match="slice_bytes must be a positive int or None"):
        fused.FusedBackend(tiny_model, torch.device("cpu"), torch.float32, slice_bytes=slice_bytes)


def _recording_freeze(monkeypatch) -> list[int]:
    """The batch of every trace the fused backend makes from now on."""
    traced = []
    real_freeze = fused._freeze
    monkeypatch.setattr(fused, "_freeze", lambda *args: traced.append(args[1].shape[0]) or real_freeze(*args))
    return traced


@pytest.mark.parametrize("max_graphs", [1, 4])
def test_fused_on_cpu_runs_a_batch_in_slices_and_traces_each_slice_size_once(tiny_model, monkeypatch, max_graphs):
    traced = _recording_freeze(monkeypatch)
    # 5 images of 20 x 24 pixels, two of them fit in a slice: slices of 2, 2 and 1 image.
    map_bytes = tiny_model.config.inner_channels * 20 * 24 * 4
    sliced = _engine(copy.deepcopy(tiny_model), scale=4, backend="fused",
                     backend_options={"slice_bytes": 3 * map_bytes - 1, "max_graphs": max_graphs})
    whole = _engine(copy.deepcopy(tiny_model), scale=4, backend="fused", backend_options={"slice_bytes": None})
    eager = _engine(copy.deepcopy(tiny_model), scale=4)
    assert sliced.backend.images_per_call(20, 24) == 2
    lr = torch.rand(5, 3, 5, 6)
    expected = eager.sample(lr, generator=_seeded(4))
    torch.testing.assert_close(sliced.sample(lr, generator=_seeded(4)), expected, rtol=1e-4, atol=1e-4)
    # One graph-cache entry per call shape, whatever its slices, so max_graphs=1 still traces.
    assert sorted(traced) == [1, 2] and sliced.backend.cached_graphs == 1
    torch.testing.assert_close(whole.sample(lr, generator=_seeded(4)), expected, rtol=1e-4, atol=1e-4)
    assert sorted(traced) == [1, 2, 5] and whole.backend.cached_graphs == 1


def test_fused_on_cpu_slices_each_batch_of_tiles(tiny_model, monkeypatch):
    traced = _recording_freeze(monkeypatch)
    options = dict(scale=4, tile=16, tile_overlap=4, max_memory=2**30)
    eager = _engine(copy.deepcopy(tiny_model), **options)
    sliced = _engine(copy.deepcopy(tiny_model), backend="fused", backend_options={"slice_bytes": 1}, **options)
    lr = torch.rand(2, 3, 7, 9)
    torch.testing.assert_close(sliced.sample(lr, generator=_seeded(4)), eager.sample(lr, generator=_seeded(4)),
                               rtol=1e-4, atol=1e-4)
    assert set(traced) == {1}


def test_fused_on_cpu_traces_a_one_step_plan_on_a_sliced_batch_in_its_second_call_only(tiny_model, monkeypatch):
    traced = _recording_freeze(monkeypatch)
    engine = _engine(copy.deepcopy(tiny_model), scale=4, backend="fused", sampler="mean",
                     backend_options={"slice_bytes": 1})
    eager = _engine(copy.deepcopy(tiny_model), scale=4, sampler="mean")
    lr = torch.rand(3, 3, 5, 6)
    for calls in (1, 2):
        torch.testing.assert_close(engine.sample(lr, generator=_seeded(calls)),
                                   eager.sample(lr, generator=_seeded(calls)), rtol=1e-4, atol=1e-4)
        assert traced == [1] * (calls - 1)


@pytest.mark.parametrize("prediction, residual_scale", [("y0", None), ("v", None), ("v", 4.0)])
@pytest.mark.parametrize("sampler", ["ancestral", "dpmpp_2m"])
def test_every_backend_serves_every_prediction_target_and_sampler(tiny_model, prediction, residual_scale, sampler):
    model = sr3.SR3UNet(dataclasses.replace(tiny_model.config, prediction=prediction, residual_scale=residual_scale))
    model.load_state_dict(tiny_model.state_dict())
    model.eval()
    lr = torch.rand(1, 3, 5, 6)
    reference = sr3.sample(copy.deepcopy(model), sr3.condition(lr, 4, model.config.size_multiple),
                           sr3.NoiseSchedule.linear(8, 1e-3, 0.2), sr3.SamplerConfig(sampler),
                           generator=_seeded(4))[..., :20, :24]
    reference = ((reference + 1) / 2).clamp(0, 1)
    for backend in ("eager", "fused"):
        engine = _engine(copy.deepcopy(model), scale=4, backend=backend, sampler=sampler,
                         schedule=sr3.NoiseSchedule.linear(8, 1e-3, 0.2))
        assert engine.prediction == prediction and engine.residual_scale == residual_scale
        torch.testing.assert_close(engine.sample(lr, generator=_seeded(4)), reference,
                                   rtol=1e-4, atol=1e-4, msg=backend)


def test_an_engine_refuses_a_prediction_its_model_contradicts(tiny_model):
    with pytest.raises(ValueError, match="prediction='v' but the model's config predicts 'eps'"):
        _engine(tiny_model, prediction="v")
    assert _engine(nn.Identity(), prediction="y0").prediction == "y0"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 2e-3), (torch.bfloat16, 6e-2)])
def test_fused_graphs_match_eager_with_the_same_noise(tiny_model, dtype, tolerance):
    eager = _engine(copy.deepcopy(tiny_model), scale=4, device="cuda", dtype=dtype)
    fused = _engine(copy.deepcopy(tiny_model), scale=4, device="cuda", dtype=dtype, backend="fused",
                    backend_options={"in_kernel_noise": False, "max_graphs": 2})
    lr = torch.rand(2, 3, 8, 8)
    for _ in range(2):  # the second call replays the captured graph
        torch.testing.assert_close(fused.sample(lr, generator=_seeded(4)), eager.sample(lr, generator=_seeded(4)),
                                   rtol=0, atol=tolerance)
    assert fused.backend.cached_graphs == 1
    for size in (4, 12):
        fused.sample(torch.rand(1, 3, size, size), generator=_seeded())
    assert fused.backend.cached_graphs == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fused_in_kernel_noise_is_seeded(tiny_model):
    fused = _engine(tiny_model, scale=4, device="cuda", dtype=torch.bfloat16, backend="fused")
    lr = torch.rand(1, 3, 8, 8)
    a = fused.sample(lr, generator=_seeded(1))
    torch.testing.assert_close(a, fused.sample(lr, generator=_seeded(1)), rtol=0, atol=0)
    assert not torch.equal(a, fused.sample(lr, generator=_seeded(2)))


def test_saved_files_follow_the_umask(tiny_model, tmp_path):
    import os

    _engine(tiny_model).save_pretrained(tmp_path)
    umask = os.umask(0)
    os.umask(umask)
    for name in ("config.json", "model.safetensors"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask


def test_compile_backend_matches_eager(tiny_model):
    eager = _engine(copy.deepcopy(tiny_model), scale=2)
    compiled = _engine(copy.deepcopy(tiny_model), scale=2, backend="compile",
                       backend_options={"compiler": "aot_eager"})
    lr = torch.rand(1, 3, 4, 4)
    torch.testing.assert_close(compiled.sample(lr, generator=_seeded(2)), eager.sample(lr, generator=_seeded(2)),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("op_backend", ["auto", "native", "cpp"])
def test_the_denoiser_compiles_as_one_graph(tiny_model, op_backend, monkeypatch):
    # A graph break splits the U-Net into per-block graphs that Dynamo recompiles per channel
    # count until its recompile limit, then runs eagerly: compile would be slower than eager.
    x = torch.rand(1, 3, 8, 8)
    _skip_unless_available(op_backend, x)
    monkeypatch.setattr(sr3.ops.dispatch, "_logged_auto_choices", set())  # the first auto choice is logged
    model = copy.deepcopy(tiny_model).eval()
    sr3.set_op_backend(model, op_backend)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    level = torch.rand(1)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, x, level), model(x, x, level), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("op_backend", ["auto", "native", "cpp"])
def test_compile_backend_compiles_native_ops_unless_told_otherwise(tiny_model, op_backend):
    # What Inductor is handed: F.group_norm and F.silu it can fuse, or the named backend's opaque op.
    _skip_unless_available(op_backend, torch.rand(1, 3, 4, 4))
    targets = []

    def recording_compiler(graph_module, example_inputs):
        targets.extend(str(node.target) for node in graph_module.graph.nodes if node.op == "call_function")
        return graph_module.forward

    torch._dynamo.reset()
    engine = _engine(tiny_model, backend="compile", op_backend=op_backend,
                     backend_options={"compiler": recording_compiler})
    engine.sample(torch.rand(1, 3, 4, 4), generator=_seeded(0))
    fused_calls = sum("sr3_engine" in target for target in targets)
    native_calls = sum("group_norm" in target and "sr3_engine" not in target for target in targets)
    # Attention's GroupNorm has no SiLU after it and stays native on every backend.
    attention_norms = sum(isinstance(m, nn.GroupNorm) for m in tiny_model.modules())
    if op_backend == "cpp":
        assert fused_calls > 0 and native_calls == attention_norms
    else:
        assert fused_calls == 0 and native_calls > attention_norms


def test_compile_backend_compiles_once_per_shape(tiny_model):
    # Step 1 used to get the caller's tensor and later steps inference tensors, a second compile.
    graphs = []

    def counting_compiler(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    torch._dynamo.reset()
    engine = _engine(tiny_model, backend="compile", backend_options={"compiler": counting_compiler, "dynamic": False})
    lr = torch.rand(2, 3, 4, 4)
    engine.sample(lr, generator=_seeded(0))
    engine.sample(lr, generator=_seeded(1))
    assert len(graphs) == 1
    engine.sample(torch.rand(1, 3, 4, 4), generator=_seeded(0))
    assert len(graphs) == 2
