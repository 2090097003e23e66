"""The openvino engine backend on the CPU, against eager on the tiny model.

Skipped when openvino or the ONNX exporter (onnx, onnxscript) is missing, except the import
guard's test, which hides openvino.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import sys

import pytest
import torch

import sr3_engine as sr3
from sr3_engine.cli import export
from sr3_engine.runtime.backends import BackendUnavailableError, create_backend

HAVE_OPENVINO = all(importlib.util.find_spec(m) is not None for m in ("openvino", "onnx", "onnxscript"))
needs_openvino = pytest.mark.skipif(not HAVE_OPENVINO, reason="openvino, onnx and onnxscript are not installed")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    torch.manual_seed(1234)
    engine = sr3.SR3Engine(sr3.SR3UNet(sr3.UNetConfig.named("tiny")), progress=False)
    return engine.save_pretrained(tmp_path_factory.mktemp("model") / "tiny")


def _onnx(tiny_dir, path, *flags: str):
    assert export.main(["--model", str(tiny_dir), "--onnx", str(path), "--no-check", *flags]) == 0
    return path


@pytest.fixture(scope="module")
def tiny_onnx(tiny_dir, tmp_path_factory):
    return _onnx(tiny_dir, tmp_path_factory.mktemp("onnx") / "tiny.onnx")


def _tiny(tiny_dir) -> sr3.SR3UNet:
    return sr3.SR3Engine.from_pretrained(tiny_dir, dtype=torch.float32, progress=False).model


@needs_openvino
def test_openvino_engine_matches_eager_for_the_same_seed_and_leaves_the_model_alone(tiny_dir, tiny_onnx):
    lr = torch.rand(2, 3, 6, 5, generator=torch.Generator().manual_seed(3))
    model = _tiny(tiny_dir).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    samples = []
    for backend, options in (("eager", None), ("openvino", None), ("openvino", {"onnx_path": str(tiny_onnx)})):
        source = model if backend == "openvino" and options is None else copy.deepcopy(model)
        engine = sr3.SR3Engine(source, sr3.NoiseSchedule.linear(100, 1e-4, 0.1), backend=backend,
                               dtype=torch.float32, backend_options=options, progress=False)
        samples.append(engine.sample(lr, steps=4, sampler="ddim", generator=torch.Generator().manual_seed(7)))
    assert samples[0].shape == (2, 3, 24, 20)
    for sample in samples[1:]:
        assert float((sample - samples[0]).abs().max()) < 1e-3
    # The engine exported a copy: the module is as it was, in training mode and float32.
    assert model.training and all(torch.equal(v, before[k]) and v.dtype == torch.float32
                                  for k, v in model.state_dict().items())


@needs_openvino
def test_tiled_and_tile_denoiser_runs_match_eager(tiny_dir, tiny_onnx):
    lr = torch.rand(1, 3, 12, 10, generator=torch.Generator().manual_seed(5))
    engines = [sr3.SR3Engine.from_pretrained(tiny_dir, backend=backend, dtype=torch.float32, progress=False,
                                             backend_options=options)
               for backend, options in (("eager", None), ("openvino", {"onnx_path": str(tiny_onnx)}))]
    tiled = [e.sample(lr, steps=3, tile=24, tile_overlap=8, generator=torch.Generator().manual_seed(1))
             for e in engines]
    assert float((tiled[1] - tiled[0]).abs().max()) < 1e-3
    x_up, y_t = torch.rand(3, 3, 16, 16) * 2 - 1, torch.randn(3, 3, 16, 16)
    level = torch.rand(3)
    with torch.inference_mode():
        outputs = [e.backend.tile_denoiser(3)(x_up, y_t, level).float() for e in engines]
    assert float((outputs[1] - outputs[0]).abs().max()) < 1e-4


@needs_openvino
def test_the_precision_is_openvinos_hint_where_its_cpu_plugin_computes_it(tiny_dir, tiny_onnx):
    import openvino

    capabilities = openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    options = {"onnx_path": str(tiny_onnx)}
    for dtype, hint, capability in ((torch.float32, "f32", "FP32"), (torch.bfloat16, "bf16", "BF16")):
        if capability in capabilities:
            backend = create_backend("openvino", _tiny(tiny_dir), torch.device("cpu"), dtype, options=options)
            assert backend.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name() == hint
        else:
            with pytest.raises(BackendUnavailableError, match=f"does not compute {dtype} on this CPU"):
                create_backend("openvino", _tiny(tiny_dir), torch.device("cpu"), dtype, options=options)


@needs_openvino
def test_properties_reach_the_compiled_model(tiny_dir, tiny_onnx):
    backend = create_backend("openvino", _tiny(tiny_dir), torch.device("cpu"), torch.float32,
                             options={"onnx_path": str(tiny_onnx), "properties": {"INFERENCE_NUM_THREADS": 1}})
    assert int(backend.compiled.get_property("INFERENCE_NUM_THREADS")) == 1


@needs_openvino
def test_a_file_of_another_dtype_or_target_is_refused(tiny_dir, tiny_onnx, tmp_path):
    half = _onnx(tiny_dir, tmp_path / "half.onnx", "--dtype", "fp16")
    with pytest.raises(ValueError, match="input 'x_up' is f16; the openvino backend takes float32 graphs"):
        create_backend("openvino", _tiny(tiny_dir), torch.device("cpu"), torch.float32,
                       options={"onnx_path": str(half)})
    v_model = sr3.SR3UNet(dataclasses.replace(sr3.UNetConfig.named("tiny"), prediction="v"))
    with pytest.raises(ValueError, match="outputs 'eps' but the model predicts 'v'"):
        create_backend("openvino", v_model, torch.device("cpu"), torch.float32, options={"onnx_path": str(tiny_onnx)})
    with pytest.raises(ValueError, match="opset applies to an export"):
        create_backend("openvino", v_model, torch.device("cpu"), torch.float32,
                       options={"onnx_path": str(tiny_onnx), "opset": 21})


@needs_openvino
def test_the_backend_runs_on_the_cpu_only():
    model = sr3.SR3UNet(sr3.UNetConfig.named("tiny"))
    with pytest.raises(BackendUnavailableError, match="runs on the CPU only; got device cuda"):
        create_backend("openvino", model, torch.device("cuda"), torch.float32)


def test_without_openvino_the_backend_says_how_to_install_it(monkeypatch):
    model = sr3.SR3UNet(sr3.UNetConfig.named("tiny"))
    monkeypatch.setitem(sys.modules, "openvino", None)
    with pytest.raises(BackendUnavailableError, match=r"openvino is not installed \(pip install 'sr3_engine\[openvino\]'\)"):
        create_backend("openvino", model, torch.device("cpu"), torch.float32)
