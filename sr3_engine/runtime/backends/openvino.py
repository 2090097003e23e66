"""The openvino backend: the denoiser as an ONNX graph compiled by OpenVINO for the CPU, the
sampling loop in the engine.

As with `onnxruntime`, only `(x_up, y_t, noise_level) -> output` leaves PyTorch; the plan, the
noise (drawn from the caller's generator as `eager` draws it) and the posterior step stay in
the engine, so an openvino sample equals the eager one for the same seed up to the graph's
rounding. A copy of the model is exported in float32 on creation (the caller's module is not
moved or cast), or `options["onnx_path"]` names a float32 file written by `python -m
sr3_engine export`.

The engine's dtype is OpenVINO's inference precision hint, not the graph's: the graph's
inputs and output stay float32 and OpenVINO runs its layers in bf16 (or fp16) where the hint
asks for it, keeping in float32 what it must. It accepts a hint only where its CPU plugin lists
the precision among its optimization capabilities (BF16: AVX-512 BF16 or AMX); elsewhere that
dtype raises BackendUnavailableError, so `dtype="auto"` gives bf16 exactly where the CPU has it.
The network runs on as many threads as torch does (`torch.get_num_threads()`), with the latency
hint (one request at a time, every core on it); `properties` adds or overrides compile
properties, e.g. `{"PERFORMANCE_HINT": "THROUGHPUT"}`. The graph's batch, height and width stay
dynamic: it is compiled once, on creation, for every shape.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn as nn

from ...samplers import Denoiser, GeneratorNoise, NoiseSource, SamplingPlan, StepCallback
from ..onnx_export import INPUT_NAMES, output_name
from ..tiling import TileGrid
from .base import BackendUnavailableError, onnx_file, run_eagerly

# The engine's dtype as OpenVINO's inference precision hint, and the capability its CPU plugin
# lists when it computes that precision.
_PRECISIONS = {torch.float32: ("f32", "FP32"), torch.bfloat16: ("bf16", "BF16"), torch.float16: ("f16", "FP16")}


def _import_openvino():
    try:
        import openvino
    except ImportError:
        raise BackendUnavailableError("engine backend 'openvino': openvino is not installed "
                                      "(pip install 'sr3_engine[openvino]')") from None
    return openvino


class OpenVINOBackend:
    name = "openvino"
    tile_limits = (None, None)
    bf16_devices = ("cpu",)

    def __init__(self, model: nn.Module, device: torch.device, dtype: torch.dtype, op_backend: str = "auto", *,
                 onnx_path: str | None = None, opset: int | None = None,
                 properties: Mapping[str, Any] | None = None):
        ov = _import_openvino()
        if device.type != "cpu":
            raise BackendUnavailableError(f"engine backend 'openvino' runs on the CPU only; got device {device}")
        self.device, self.dtype, self.op_backend = device, dtype, op_backend
        core = ov.Core()
        hint, capability = _PRECISIONS[dtype]
        capabilities = core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        if capability not in capabilities:
            raise BackendUnavailableError(f"engine backend 'openvino': its CPU plugin does not compute {dtype} on "
                                          f"this CPU (it lists {', '.join(capabilities)})")
        self.onnx_path, self._tmpdir = onnx_file(self.name, model, torch.float32, onnx_path, opset)
        graph = core.read_model(str(self.onnx_path))
        self.output_name = graph.outputs[0].get_any_name()
        if self.output_name != output_name(model):
            raise ValueError(f"engine backend 'openvino': {self.onnx_path} outputs {self.output_name!r} but the "
                             f"model predicts {output_name(model)!r}; export this model")
        found = {i.get_any_name(): i.get_element_type().get_type_name() for i in graph.inputs}
        for name in INPUT_NAMES:
            if found.get(name) != "f32":
                raise ValueError(f"{self.onnx_path}: input {name!r} is {found.get(name, 'missing')}; the openvino "
                                 "backend takes float32 graphs (export with --dtype fp32; the engine's dtype is "
                                 "OpenVINO's precision hint)")
        self.properties = {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY",
                           "INFERENCE_NUM_THREADS": torch.get_num_threads(), **dict(properties or {})}
        self.compiled = core.compile_model(graph, "CPU", self.properties)
        self.request = self.compiled.create_infer_request()

    def denoise(self, x_up: torch.Tensor, y_t: torch.Tensor, noise_level: torch.Tensor) -> torch.Tensor:
        inputs = (x_up, y_t, noise_level)
        result = self.request.infer({name: t.float().contiguous().numpy() for name, t in zip(INPUT_NAMES, inputs)},
                                    share_inputs=True)
        return torch.from_numpy(result[0])

    def run(self, x_up: torch.Tensor, y_T: torch.Tensor, plan: SamplingPlan, *,
            generator: torch.Generator | None, callback: StepCallback | None,
            tiles: TileGrid | None = None) -> torch.Tensor:
        return run_eagerly(self.denoise, self.device, x_up, y_T, plan, generator=generator,
                           callback=callback, tiles=tiles, op_backend=self.op_backend)

    def step_noise(self, generator: torch.Generator | None) -> NoiseSource:
        return GeneratorNoise(generator)

    def tile_denoiser(self, capacity: int) -> Denoiser:
        return self.denoise
