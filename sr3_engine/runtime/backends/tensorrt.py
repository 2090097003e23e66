"""The tensorrt backend: the denoiser as a TensorRT engine (TensorRT 10.x Python API).

As with `onnxruntime`, only `(x_up, y_t, noise_level) -> eps` leaves PyTorch; the plan,
the noise and the posterior step stay in the engine, so samples follow the caller's
generator. The model is exported to ONNX in float32 (or `onnx_path` is used) and the
precision is chosen by builder flags (FP16/BF16 per the engine's dtype), which lets
TensorRT keep single layers in float32.

Traps this backend handles, and those it only documents:
- fp16/bf16 GroupNorm: the variance of a wide group overflows or loses its low bits in
  half precision, so every normalization layer is pinned to float32 (layer precision and
  output type, with OBEY_PRECISION_CONSTRAINTS); the rest runs in the requested dtype.
- Group sizes: TensorRT's fastest GroupNorm kernels want channels per group a multiple of
  8; other layouts build but run a slower generic normalization (logged, not an error).
- Dynamic shapes: one optimisation profile from `min_shape`/`opt_shape`/`max_shape`
  (BxHxW); a shape outside it is refused with the profile in the message. Kernels are
  tuned for `opt_shape`.
- CUDA graphs: not used here; a graph freezes one shape, so it would need one capture per
  (batch, height, width) on top of the profile.
- Build time: minutes for a large model, so engines are cached on disk, keyed by
  sha256(onnx bytes), the profile, the precision, tensorrt.__version__ and the GPU name,
  and the builder's timing cache is kept beside them.

Buffers are preallocated per input shape and bound with `set_tensor_address`; each step
copies its inputs into them and runs `execute_async_v3` on torch's current stream, so no
synchronisation with the host happens.
"""

from __future__ import annotations

import hashlib
import logging
import os
import copy
import tempfile
from pathlib import Path

import torch
import torch.nn as nn

from ...io import atomic_path
from ...samplers import Denoiser, GeneratorNoise, NoiseSource, SamplingPlan, StepCallback
from ..onnx_export import export_onnx
from ..tiling import TileGrid
from .base import BackendUnavailableError, run_eagerly

logger = logging.getLogger(__name__)

Shape = tuple[int, int, int]
DEFAULT_CACHE_DIR = Path(os.environ.get("SR3_ENGINE_CACHE", Path.home() / ".cache" / "sr3_engine")) / "tensorrt"
_PRECISIONS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def import_tensorrt():
    """The tensorrt module, or BackendUnavailableError saying why it cannot be used."""
    try:
        import tensorrt
    except ImportError:
        raise BackendUnavailableError("engine backend 'tensorrt': tensorrt is not installed "
                                      "(pip install tensorrt; it needs an NVIDIA GPU)") from None
    if int(tensorrt.__version__.split(".")[0]) < 10:
        raise BackendUnavailableError(f"engine backend 'tensorrt': needs TensorRT >= 10; found {tensorrt.__version__}")
    return tensorrt


def _profile_shapes(name: str, shape: Shape) -> tuple[int, ...]:
    batch, height, width = shape
    return (batch,) if name == "noise_level" else (batch, 3, height, width)


def engine_key(onnx_bytes: bytes, dtype: torch.dtype, shapes: tuple[Shape, Shape, Shape], trt_version: str,
               gpu: str) -> str:
    digest = hashlib.sha256(onnx_bytes)
    digest.update(repr((shapes, _PRECISIONS[dtype], trt_version, gpu)).encode())
    return digest.hexdigest()


def build_engine(onnx_bytes: bytes, plan_path: str | os.PathLike, dtype: torch.dtype, min_shape: Shape,
                 opt_shape: Shape, max_shape: Shape, *, timing_cache: str | os.PathLike | None = None) -> Path:
    """Build a serialized engine from ONNX bytes and write it to `plan_path` atomically."""
    trt = import_tensorrt()
    if not torch.cuda.is_available():
        raise BackendUnavailableError("engine backend 'tensorrt': no CUDA device")
    for low, mid, high in zip(min_shape, opt_shape, max_shape):
        if not low <= mid <= high:
            raise ValueError(f"tensorrt profile: need min <= opt <= max per dimension; got {min_shape}, "
                             f"{opt_shape}, {max_shape}")
    trt_logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(trt_logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse(onnx_bytes):
        errors = "; ".join(str(parser.get_error(i).desc()) for i in range(parser.num_errors))
        raise ValueError(f"tensorrt could not parse the ONNX graph: {errors}")

    config = builder.create_builder_config()
    if dtype == torch.float16:
        config.set_flag(trt.BuilderFlag.FP16)
    elif dtype == torch.bfloat16:
        config.set_flag(trt.BuilderFlag.BF16)
    if dtype != torch.float32:
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        _pin_normalization_to_fp32(trt, network)
    profile = builder.create_optimization_profile()
    for name in ("x_up", "y_t", "noise_level"):
        profile.set_shape(name, *(_profile_shapes(name, s) for s in (min_shape, opt_shape, max_shape)))
    config.add_optimization_profile(profile)

    cache_path = Path(timing_cache) if timing_cache is not None else None
    cache_bytes = cache_path.read_bytes() if cache_path is not None and cache_path.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError("tensorrt failed to build the engine (see its log above)")
    if cache_path is not None:
        with atomic_path(cache_path) as tmp:
            tmp.write_bytes(memoryview(cache.serialize()))
    with atomic_path(plan_path) as tmp:
        tmp.write_bytes(memoryview(serialized))
    return Path(plan_path)


def _pin_normalization_to_fp32(trt, network) -> None:
    slow = 0
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        if layer.type != trt.LayerType.NORMALIZATION:
            continue
        # get_layer returns the base ILayer, which has no num_groups (reading it through getattr
        # with a default counted every layer as one group): set the class of its type first.
        layer.__class__ = trt.INormalizationLayer
        layer.precision = trt.float32
        layer.set_output_type(0, trt.float32)
        channels = layer.get_input(0).shape[1]
        if channels > 0 and (channels // max(layer.num_groups, 1)) % 8:
            slow += 1
    if slow:
        logger.warning("tensorrt: %d GroupNorm layers have channels per group not a multiple of 8; "
                       "they run TensorRT's generic normalization", slow)


class TensorRTBackend:
    name = "tensorrt"
    bf16_devices = ("cuda",)

    def __init__(self, model: nn.Module, device: torch.device, dtype: torch.dtype, op_backend: str = "auto", *,
                 onnx_path: str | None = None, min_shape: Shape = (1, 64, 64), opt_shape: Shape = (1, 256, 256),
                 max_shape: Shape = (4, 512, 512), cache_dir: str | os.PathLike | None = None):
        trt = import_tensorrt()
        if device.type != "cuda":
            raise BackendUnavailableError(f"engine backend 'tensorrt' runs on CUDA only; got device {device}")
        self.device, self.dtype, self.op_backend = device, dtype, op_backend
        self.shapes = (tuple(min_shape), tuple(opt_shape), tuple(max_shape))
        if onnx_path is None:
            # A copy is exported, in float32: the builder flags choose the precision layer by layer.
            with tempfile.TemporaryDirectory(prefix="sr3_trt_") as tmp:
                copy_fp32 = copy.deepcopy(model).to("cpu", torch.float32)
                onnx_bytes = export_onnx(copy_fp32, Path(tmp) / "denoiser.onnx").read_bytes()
        else:
            onnx_bytes = Path(onnx_path).read_bytes()
        cache = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE_DIR
        key = engine_key(onnx_bytes, dtype, self.shapes, trt.__version__, torch.cuda.get_device_name(device))
        plan_path = cache / f"{key}.plan"
        if not plan_path.is_file():
            with torch.cuda.device(device):
                build_engine(onnx_bytes, plan_path, dtype, *self.shapes, timing_cache=cache / "timing.cache")
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self._runtime.deserialize_cuda_engine(plan_path.read_bytes())
        if self.engine is None:
            raise RuntimeError(f"{plan_path}: tensorrt could not load this engine (delete it to rebuild)")
        self.context = self.engine.create_execution_context()
        self._io_dtypes = {name: _torch_dtype(trt, self.engine.get_tensor_dtype(name))
                           for name in ("x_up", "y_t", "noise_level", "eps")}
        self._buffers: dict[str, torch.Tensor] = {}
        self._bound_shape: tuple[int, ...] | None = None
        # Tiles stay within the optimisation profile: at most its batch, at most its smaller side.
        self.tile_limits = (self.shapes[2][0], min(self.shapes[2][1:]))

    def _bind(self, shape: tuple[int, ...]) -> None:
        batch, _, height, width = shape
        low, _, high = self.shapes
        if not all(lo <= v <= hi for lo, v, hi in zip(low, (batch, height, width), high)):
            raise ValueError(f"engine backend 'tensorrt': batch x height x width {batch}x{height}x{width} is outside "
                             f"the optimisation profile {low}..{high} (pass min_shape/max_shape in backend_options)")
        for name in ("x_up", "y_t", "noise_level", "eps"):
            size = (batch,) if name == "noise_level" else shape
            self._buffers[name] = torch.empty(size, device=self.device, dtype=self._io_dtypes[name])
            if name != "eps":
                self.context.set_input_shape(name, size)
            self.context.set_tensor_address(name, self._buffers[name].data_ptr())
        self._bound_shape = shape

    def denoise(self, x_up: torch.Tensor, y_t: torch.Tensor, noise_level: torch.Tensor) -> torch.Tensor:
        if self._bound_shape != tuple(x_up.shape):
            self._bind(tuple(x_up.shape))
        self._buffers["x_up"].copy_(x_up)
        self._buffers["y_t"].copy_(y_t)
        self._buffers["noise_level"].copy_(noise_level)
        if not self.context.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise RuntimeError("engine backend 'tensorrt': execute_async_v3 failed (see the tensorrt log)")
        # The next step overwrites this buffer only after the posterior step read it: same stream.
        return self._buffers["eps"].to(self.dtype)

    def run(self, x_up: torch.Tensor, y_T: torch.Tensor, plan: SamplingPlan, *,
            generator: torch.Generator | None, callback: StepCallback | None,
            tiles: TileGrid | None = None) -> torch.Tensor:
        return run_eagerly(self.denoise, self.device, x_up.to(self.dtype), y_T, plan, generator=generator,
                           callback=callback, tiles=tiles, op_backend=self.op_backend)

    def step_noise(self, generator: torch.Generator | None) -> NoiseSource:
        return GeneratorNoise(generator)

    def tile_denoiser(self, capacity: int) -> Denoiser:
        return self.denoise


def _torch_dtype(trt, dtype) -> torch.dtype:
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16}
    if dtype not in table:
        raise ValueError(f"engine backend 'tensorrt': unsupported I/O tensor type {dtype}")
    return table[dtype]
