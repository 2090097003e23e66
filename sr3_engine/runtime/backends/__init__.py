"""How a whole denoiser runs. Each engine backend turns (model, device, dtype) into an
object with `run(x_up, y_T, plan, *, generator, callback) -> y_0`; the sampling plan
(float64 per-step scalars) is the same for all of them, and so is the step they apply
(`samplers.posterior_update`)."""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn as nn

from .base import Backend, BackendUnavailableError
from .compile import CompileBackend
from .eager import EagerBackend
from .fused import FusedBackend
from .onnxruntime import OnnxRuntimeBackend
from .openvino import OpenVINOBackend
from .tensorrt import TensorRTBackend

# The one registry of engine backends; the commands take their choices from it.
BACKENDS: dict[str, type] = {
    "eager": EagerBackend,
    "fused": FusedBackend,
    "compile": CompileBackend,
    "onnxruntime": OnnxRuntimeBackend,
    "openvino": OpenVINOBackend,
    "tensorrt": TensorRTBackend,
}
ENGINE_BACKENDS = tuple(BACKENDS)


def computes_bf16(name: str, device: torch.device) -> bool:
    """Whether the named backend computes bf16 natively on this kind of device, given a device that
    does (its class's `bf16_devices`): what `dtype="auto"` asks of a backend before choosing bf16."""
    if name not in BACKENDS:
        raise ValueError(f"unknown engine backend {name!r}; choose one of {ENGINE_BACKENDS}")
    return device.type in BACKENDS[name].bf16_devices


def create_backend(name: str, model: nn.Module, device: torch.device, dtype: torch.dtype,
                   op_backend: str = "auto", options: Mapping[str, Any] | None = None) -> Backend:
    """The named engine backend; `options` are its own keyword arguments (e.g. fused's max_graphs)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown engine backend {name!r}; choose one of {ENGINE_BACKENDS}")
    return BACKENDS[name](model, device, dtype, op_backend, **dict(options or {}))


__all__ = ["BACKENDS", "Backend", "BackendUnavailableError", "ENGINE_BACKENDS", "computes_bf16", "create_backend"]
