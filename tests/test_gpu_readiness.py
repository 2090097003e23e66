"""What would break the first time a GPU runs the engine: checked here where a CPU can, and by
gpu-marked tests (skipped without CUDA) where only a GPU can."""

import copy
import types

import pytest
import torch

import sr3_engine as sr3
from sr3_engine.runtime.backends import tensorrt as trt_backend

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _fake_tensorrt(channels: int, groups: int):
    class Layer:
        type = "normalization"
        precision = None

        def set_output_type(self, index, dtype):
            self.output_type = dtype

        def get_input(self, index):
            return types.SimpleNamespace(shape=(1, channels, 8, 8))

    class NormalizationLayer(Layer):
        num_groups = groups

    network = types.SimpleNamespace(num_layers=1, get_layer=lambda index: Layer())
    trt = types.SimpleNamespace(LayerType=types.SimpleNamespace(NORMALIZATION="normalization"),
                                INormalizationLayer=NormalizationLayer, float32="fp32")
    return trt, network


@pytest.mark.parametrize("channels, groups, slow", [(96, 24, True), (128, 16, False), (64, 32, True)])
def test_tensorrt_reads_each_groupnorm_layers_own_group_count(channels, groups, slow, monkeypatch):
    warnings = []
    monkeypatch.setattr(trt_backend.logger, "warning", lambda message, *args: warnings.append(message % args))
    trt, network = _fake_tensorrt(channels, groups)
    trt_backend._pin_normalization_to_fp32(trt, network)
    assert any("channels per group not a multiple of 8" in w for w in warnings) == slow


@pytest.mark.gpu
@needs_cuda
def test_a_captured_loop_replays_the_same_after_other_allocations(tiny_model):
    engine = sr3.SR3Engine(copy.deepcopy(tiny_model), sr3.NoiseSchedule.linear(8, 1e-3, 0.2), scale=2,
                           backend="fused", device="cuda", dtype=torch.bfloat16, progress=False)
    lr = torch.rand(2, 3, 8, 8, device="cuda")
    first = engine.sample(lr, generator=torch.Generator().manual_seed(3))
    # Freed memory the graph still read would now hold these values.
    clutter = [torch.full((1 << 20,), float(i), device="cuda") for i in range(64)]
    again = engine.sample(lr, generator=torch.Generator().manual_seed(3))
    del clutter
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    assert engine.backend.cached_graphs == 1


@pytest.mark.gpu
@needs_cuda
def test_a_captured_loop_owns_every_input_it_reads(tiny_model):
    if "check_input_liveness" not in torch.cuda.graph.__init__.__code__.co_varnames:
        pytest.skip("this torch's torch.cuda.graph has no check_input_liveness")
    from sr3_engine.runtime.backends import fused

    original = torch.cuda.graph

    def checked(*args, **kwargs):
        return original(*args, check_input_liveness=True, **kwargs)

    fused.torch.cuda.graph = checked
    try:
        engine = sr3.SR3Engine(copy.deepcopy(tiny_model), sr3.NoiseSchedule.linear(6, 1e-3, 0.2), scale=2,
                               backend="fused", device="cuda", dtype=torch.bfloat16, progress=False)
        engine.sample(torch.rand(1, 3, 8, 8, device="cuda"), generator=torch.Generator().manual_seed(0))
    finally:
        fused.torch.cuda.graph = original


@pytest.mark.gpu
@needs_cuda
def test_onnxruntime_on_cuda_runs_on_a_stream_of_the_engine(tiny_model):
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("this onnxruntime has no CUDAExecutionProvider")
    engine = sr3.SR3Engine(copy.deepcopy(tiny_model), backend="onnxruntime", device="cuda", progress=False)
    options = engine.backend.session.get_provider_options()["CUDAExecutionProvider"]
    assert options["user_compute_stream"] == str(engine.backend.stream.cuda_stream) != "0"


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_a_fused_engine_captures_and_replays_on_its_own_device(tiny_model):
    torch.cuda.set_device(0)
    engine = sr3.SR3Engine(copy.deepcopy(tiny_model), sr3.NoiseSchedule.linear(6, 1e-3, 0.2), scale=2,
                           backend="fused", device="cuda:1", dtype=torch.bfloat16, progress=False)
    lr = torch.rand(1, 3, 8, 8, device="cuda:1")
    first = engine.sample(lr, generator=torch.Generator().manual_seed(0))
    assert first.device == torch.device("cuda:1") and torch.cuda.current_device() == 0
    torch.testing.assert_close(engine.sample(lr, generator=torch.Generator().manual_seed(0)), first, rtol=0, atol=0)
