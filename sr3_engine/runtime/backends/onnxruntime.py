"""The onnxruntime backend: the denoiser as an ONNX graph, the sampling loop in the engine.

Only `(x_up, y_t, noise_level) -> eps` runs in onnxruntime; the plan, the noise (drawn
from the caller's generator exactly as `eager` draws it) and the posterior step stay in
PyTorch, so an onnxruntime sample equals the eager one for the same seed up to the
graph's rounding. A copy of the model is exported on creation (into a temporary directory
kept for the backend's life; the caller's module is not moved or cast), or
`options["onnx_path"]` names a file written by `python -m sr3_engine export` and is loaded
as it is.

Providers are chosen explicitly, never by onnxruntime's fallback: CPUExecutionProvider on
the CPU; on CUDA, CUDAExecutionProvider or BackendUnavailableError. On CUDA the inputs and
output are bound to the torch tensors' device memory (IO binding) and the session runs on a
stream the backend owns, ordered after and before torch's current stream by stream waits, so
nothing is copied through the host.
bfloat16 is refused: onnxruntime's CPU provider has no bfloat16 Conv and IO binding takes
numpy element types, which have no bfloat16.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from ...samplers import Denoiser, GeneratorNoise, NoiseSource, SamplingPlan, StepCallback
from ..onnx_export import output_name
from ..tiling import TileGrid
from .base import BackendUnavailableError, onnx_file, run_eagerly

_NUMPY_DTYPES = {torch.float32: np.float32, torch.float16: np.float16}
_ONNX_TYPES = {torch.float32: "tensor(float)", torch.float16: "tensor(float16)"}


def _import_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise BackendUnavailableError("engine backend 'onnxruntime': onnxruntime is not installed "
                                      "(pip install 'sr3_engine[export]')") from None
    return onnxruntime


class OnnxRuntimeBackend:
    name = "onnxruntime"
    tile_limits = (None, None)
    # bfloat16 is refused on every device (see the module docstring).
    bf16_devices = ()

    def __init__(self, model: nn.Module, device: torch.device, dtype: torch.dtype, op_backend: str = "auto", *,
                 onnx_path: str | None = None, opset: int | None = None):
        ort = _import_onnxruntime()
        if dtype not in _NUMPY_DTYPES:
            raise BackendUnavailableError(f"engine backend 'onnxruntime': {dtype} is not supported "
                                          "(use torch.float32 or torch.float16)")
        self.device, self.dtype, self.op_backend = device, dtype, op_backend
        # onnxruntime reads a user_compute_stream of 0 (torch's default stream) as "none given" and
        # then runs on a stream of its own, unordered with torch's: the engine owns a real one.
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        providers = self._providers(ort, device)
        self.onnx_path, self._tmpdir = onnx_file(self.name, model, dtype, onnx_path, opset)
        self.session = ort.InferenceSession(str(self.onnx_path), providers=providers)
        self.output_name = self.session.get_outputs()[0].name
        if self.output_name != output_name(model):
            raise ValueError(f"engine backend 'onnxruntime': {self.onnx_path} outputs {self.output_name!r} but the "
                             f"model predicts {output_name(model)!r}; export this model")
        found = {i.name: i.type for i in self.session.get_inputs()}
        wanted_types = {"x_up": _ONNX_TYPES[dtype], "y_t": _ONNX_TYPES[dtype], "noise_level": "tensor(float)"}
        for name, wanted in wanted_types.items():
            if found.get(name) != wanted:
                raise ValueError(f"{self.onnx_path}: input {name!r} is {found.get(name, 'missing')}; this engine "
                                 f"({dtype}) needs {wanted} (export with the matching --dtype)")

    def _providers(self, ort, device: torch.device) -> list:
        if device.type == "cpu":
            return ["CPUExecutionProvider"]
        if device.type != "cuda":
            raise BackendUnavailableError(f"engine backend 'onnxruntime': no execution provider for {device.type}")
        available = ort.get_available_providers()
        if "CUDAExecutionProvider" not in available:
            raise BackendUnavailableError("engine backend 'onnxruntime': this onnxruntime has no "
                                          f"CUDAExecutionProvider (it has {available}; install onnxruntime-gpu)")
        index = device.index if device.index is not None else torch.cuda.current_device()
        return [("CUDAExecutionProvider", {"device_id": index, "user_compute_stream": str(self.stream.cuda_stream)})]

    def denoise(self, x_up: torch.Tensor, y_t: torch.Tensor, noise_level: torch.Tensor) -> torch.Tensor:
        inputs = {"x_up": x_up.contiguous(), "y_t": y_t.contiguous(), "noise_level": noise_level.float().contiguous()}
        if self.device.type == "cpu":
            (output,) = self.session.run([self.output_name], {name: t.numpy() for name, t in inputs.items()})
            return torch.from_numpy(output)
        eps = torch.empty_like(inputs["y_t"])
        binding = self.session.io_binding()
        index = eps.device.index
        for name, tensor in inputs.items():
            binding.bind_input(name, "cuda", index, _NUMPY_DTYPES[tensor.dtype], tuple(tensor.shape),
                               tensor.data_ptr())
        binding.bind_output(self.output_name, "cuda", index, _NUMPY_DTYPES[eps.dtype], tuple(eps.shape),
                            eps.data_ptr())
        # The session runs on the engine's stream: after the work that made its inputs, before
        # the work that reads eps, both on torch's current stream.
        current = torch.cuda.current_stream(eps.device)
        self.stream.wait_stream(current)
        self.session.run_with_iobinding(binding)
        current.wait_stream(self.stream)
        for tensor in (*inputs.values(), eps):
            tensor.record_stream(self.stream)
        return eps

    def run(self, x_up: torch.Tensor, y_T: torch.Tensor, plan: SamplingPlan, *,
            generator: torch.Generator | None, callback: StepCallback | None,
            tiles: TileGrid | None = None) -> torch.Tensor:
        return run_eagerly(self.denoise, self.device, x_up.to(self.dtype), y_T, plan, generator=generator,
                           callback=callback, tiles=tiles, op_backend=self.op_backend)

    def step_noise(self, generator: torch.Generator | None) -> NoiseSource:
        return GeneratorNoise(generator)

    def tile_denoiser(self, capacity: int) -> Denoiser:
        return self.denoise
