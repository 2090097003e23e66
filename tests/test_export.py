"""ONNX export, the onnxruntime engine backend and the tensorrt import guard, on the CPU.

The export tests are skipped when onnx, onnxscript or onnxruntime is missing; the tensorrt
guard is tested everywhere, the TensorRT build only where tensorrt is installed."""

from __future__ import annotations

import collections
import copy
import dataclasses
import importlib.util

import pytest
import torch

import sr3_engine as sr3
from sr3_engine.cli import export
from sr3_engine.runtime import onnx_export
from sr3_engine.runtime.backends import BackendUnavailableError, create_backend

HAVE_ONNX = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxscript", "onnxruntime"))
HAVE_TENSORRT = importlib.util.find_spec("tensorrt") is not None
needs_onnx = pytest.mark.skipif(not HAVE_ONNX, reason="onnx, onnxscript and onnxruntime are not installed")


def _save(tmp_path, name: str = "tiny"):
    torch.manual_seed(1234)
    engine = sr3.SR3Engine(sr3.SR3UNet(sr3.UNetConfig.named(name)), progress=False)
    return engine.save_pretrained(tmp_path / name)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return _save(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def tiny_onnx(tiny_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    assert export.main(["--model", str(tiny_dir), "--onnx", str(path)]) == 0
    return path


def _op_counts(path) -> collections.Counter:
    import onnx

    return collections.Counter(node.op_type for node in onnx.load(str(path)).graph.node)


@needs_onnx
def test_export_round_trip_writes_a_valid_named_graph(tiny_onnx):
    import onnx

    onnx.checker.check_model(str(tiny_onnx))
    model = onnx.load(str(tiny_onnx))
    assert [i.name for i in model.graph.input] == ["x_up", "y_t", "noise_level"]
    assert [o.name for o in model.graph.output] == ["eps"]
    assert {o.domain: o.version for o in model.opset_import}[""] == 21
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, "height", "width"]
    assert not list(tiny_onnx.parent.glob(".*.tmp"))  # the atomic write left nothing behind


@needs_onnx
def test_group_norm_exports_as_group_normalization(tiny_onnx):
    counts = _op_counts(tiny_onnx)
    norms = sum(isinstance(m, (torch.nn.GroupNorm, sr3.unet.GroupNormSiLU))
                for m in sr3.SR3UNet(sr3.UNetConfig.named("tiny")).modules())
    assert counts["GroupNormalization"] == norms
    assert counts["InstanceNormalization"] == 0


@needs_onnx
def test_dynamic_shapes_run_at_other_batch_and_size(tiny_onnx, tiny_dir):
    import onnxruntime as ort

    model = sr3.SR3Engine.from_pretrained(tiny_dir, progress=False).model
    session = ort.InferenceSession(str(tiny_onnx), providers=["CPUExecutionProvider"])
    inputs = onnx_export.example_inputs(3, 24, 32, torch.float32)  # exported at 1x16x16
    (eps,) = session.run(["eps"], {n: t.numpy() for n, t in zip(onnx_export.INPUT_NAMES, inputs)})
    with torch.no_grad():
        reference = model(*inputs)
    assert eps.shape == (3, 3, 24, 32)
    assert float((torch.from_numpy(eps) - reference).abs().max()) < onnx_export.TOLERANCE[torch.float32]


@needs_onnx
def test_fp16_export_checks_within_its_tolerance(tiny_dir, tmp_path, capsys):
    out = tmp_path / "tiny16.onnx"
    assert export.main(["--model", str(tiny_dir), "--onnx", str(out), "--dtype", "fp16", "--static"]) == 0
    summary = capsys.readouterr().out
    assert "x_up: float16[1, 3, 16, 16]" in summary and "noise_level: float32[1]" in summary


@needs_onnx
def test_check_above_tolerance_exits_1(tiny_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(export.TOLERANCE, torch.float32, 0.0)
    assert export.main(["--model", str(tiny_dir), "--onnx", str(tmp_path / "x.onnx")]) == 1
    assert "check failed: max abs error" in capsys.readouterr().err


@needs_onnx
def test_onnxruntime_engine_matches_eager_for_the_same_seed(tiny_dir, tiny_onnx):
    lr = torch.rand(2, 3, 6, 5, generator=torch.Generator().manual_seed(3))
    samples = []
    for backend, options in (("eager", None), ("onnxruntime", None), ("onnxruntime", {"onnx_path": str(tiny_onnx)})):
        engine = sr3.SR3Engine.from_pretrained(tiny_dir, backend=backend, backend_options=options, progress=False)
        samples.append(engine.sample(lr, steps=4, generator=torch.Generator().manual_seed(7)))
    assert samples[0].shape == (2, 3, 24, 20)
    for sample in samples[1:]:
        assert float((sample - samples[0]).abs().max()) < 1e-3


@needs_onnx
def test_onnxruntime_backend_exports_a_copy_and_leaves_the_model_alone():
    model = sr3.SR3UNet(sr3.UNetConfig.named("tiny")).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sr3.SR3Engine(model, backend="onnxruntime", dtype=torch.float16, progress=False)
    assert model.training and all(torch.equal(v, before[k]) and v.dtype == torch.float32
                                  for k, v in model.state_dict().items())


@needs_onnx
def test_onnxruntime_backend_refuses_a_file_of_another_dtype(tiny_dir, tiny_onnx):
    model = sr3.SR3UNet(sr3.UNetConfig.named("tiny"))
    with pytest.raises(ValueError, match="input 'x_up' is tensor\\(float\\); this engine .*float16"):
        create_backend("onnxruntime", model, torch.device("cpu"), torch.float16,
                       options={"onnx_path": str(tiny_onnx)})


@needs_onnx
def test_a_v_model_exports_its_output_as_v_and_serves_like_eager(tmp_path):
    import onnx

    torch.manual_seed(0)
    model = sr3.SR3UNet(dataclasses.replace(sr3.UNetConfig.named("tiny"), prediction="v")).eval()
    path = onnx_export.export_onnx(copy.deepcopy(model), tmp_path / "v.onnx")
    assert [o.name for o in onnx.load(str(path)).graph.output] == ["v"]
    lr = torch.rand(1, 3, 6, 5, generator=torch.Generator().manual_seed(3))
    samples = [sr3.SR3Engine(copy.deepcopy(model), backend=backend, sampler="dpmpp_2m", progress=False,
                             backend_options=options).sample(lr, steps=4, generator=torch.Generator().manual_seed(7))
               for backend, options in (("eager", None), ("onnxruntime", {"onnx_path": str(path)}))]
    assert float((samples[1] - samples[0]).abs().max()) < 1e-3
    eps_model = sr3.SR3UNet(sr3.UNetConfig.named("tiny"))
    with pytest.raises(ValueError, match="outputs 'v' but the model predicts 'eps'"):
        create_backend("onnxruntime", eps_model, torch.device("cpu"), torch.float32, options={"onnx_path": str(path)})


@needs_onnx
def test_onnxruntime_backend_names_why_it_cannot_run():
    model = sr3.SR3UNet(sr3.UNetConfig.named("tiny"))
    with pytest.raises(BackendUnavailableError, match="bfloat16 is not supported"):
        create_backend("onnxruntime", model, torch.device("cpu"), torch.bfloat16)


@needs_onnx
@pytest.mark.parametrize(("args", "message"), [
    (["--opset", "17"], "opset 17 is too old for GroupNormalization (needs >= 18)"),
    (["--dtype", "bf16"], "--dtype bf16 cannot be checked"),
])
def test_bad_arguments_exit_2_with_one_line(tiny_dir, tmp_path, capsys, args, message):
    out = tmp_path / "x.onnx"
    assert export.main(["--model", str(tiny_dir), "--onnx", str(out), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert not out.exists()


@needs_onnx
def test_missing_model_dir_exits_2(tmp_path, capsys):
    assert export.main(["--model", str(tmp_path / "nope"), "--onnx", str(tmp_path / "x.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert "not a model directory" in err and "\n" not in err


@needs_onnx
def test_unwritable_output_exits_2(tiny_dir, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")  # a file where the output's directory should be
    assert export.main(["--model", str(tiny_dir), "--onnx", str(blocker / "x.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot write there" in err and "\n" not in err


def test_bad_shape_string_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        export.main(["--model", "m", "--onnx", "o.onnx", "--min-shape", "1x64"])
    assert exit_info.value.code == 2
    assert "expected BxHxW" in capsys.readouterr().err


@pytest.mark.skipif(HAVE_TENSORRT, reason="tensorrt is installed: the guard does not fire")
def test_tensorrt_backend_names_why_it_is_unavailable():
    model = sr3.SR3UNet(sr3.UNetConfig.named("tiny"))
    with pytest.raises(BackendUnavailableError, match="tensorrt is not installed"):
        create_backend("tensorrt", model, torch.device("cpu"), torch.float32)


@needs_onnx
@pytest.mark.skipif(HAVE_TENSORRT, reason="tensorrt is installed: the guard does not fire")
def test_export_trt_without_tensorrt_exits_2_before_writing(tiny_dir, tmp_path, capsys):
    out = tmp_path / "x.onnx"
    assert export.main(["--model", str(tiny_dir), "--onnx", str(out), "--trt", str(tmp_path / "x.plan")]) == 2
    assert "tensorrt is not installed" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.skipif(not HAVE_TENSORRT, reason="tensorrt is not installed")
def test_tensorrt_engine_matches_eager(tiny_dir, tmp_path):
    lr = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    samples = []
    for backend, options in (("eager", None), ("tensorrt", {"cache_dir": str(tmp_path), "min_shape": (1, 64, 64),
                                                            "opt_shape": (1, 64, 64), "max_shape": (2, 64, 64)})):
        engine = sr3.SR3Engine.from_pretrained(tiny_dir, backend=backend, device="cuda", backend_options=options,
                                               progress=False)
        samples.append(engine.sample(lr, steps=4, generator=torch.Generator("cuda").manual_seed(7)))
    assert float((samples[1] - samples[0]).abs().max()) < 1e-2
    assert list(tmp_path.glob("*.plan"))


@needs_onnx
@pytest.mark.slow
def test_export_round_trip_sr3_16_128(tmp_path):
    out = tmp_path / "sr3.onnx"
    assert export.main(["--model", str(_save(tmp_path, "sr3-16-128")), "--onnx", str(out)]) == 0
    assert _op_counts(out)["GroupNormalization"] > 0
