"""How a whole denoiser runs. Each engine backend turns (model, device, dtype) into an
object with `run(x_up, y_T, plan, *, generator, callback) -> y_0`; the sampling plan
(float64 per-step scalars) is the same for all of them."""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn as nn

from .base import Backend, BackendUnavailableError

ENGINE_BACKENDS = ("eager", "fused", "compile", "onnxruntime", "tensorrt")


def create_backend(name: str, model: nn.Module, device: torch.device, dtype: torch.dtype,
                   op_backend: str = "auto", options: Mapping[str, Any] | None = None) -> Backend:
    """The named engine backend; `options` are its own keyword arguments (e.g. fused's max_graphs)."""
    if name not in ENGINE_BACKENDS:
        raise ValueError(f"unknown engine backend {name!r}; choose one of {ENGINE_BACKENDS}")
    options = dict(options or {})
    if name == "eager":
        from .eager import EagerBackend

        return EagerBackend(model, device, dtype, op_backend, **options)
    if name == "compile":
        from .compile import CompileBackend

        return CompileBackend(model, device, dtype, op_backend, **options)
    if name == "fused":
        from .fused import FusedBackend

        return FusedBackend(model, device, dtype, op_backend, **options)
    if name == "onnxruntime":
        from .onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend(model, device, dtype, op_backend, **options)
    if name == "tensorrt":
        from .tensorrt import TensorRTBackend

        return TensorRTBackend(model, device, dtype, op_backend, **options)
    raise BackendUnavailableError(f"engine backend {name!r} is not implemented in this version of sr3_engine")


__all__ = ["Backend", "BackendUnavailableError", "ENGINE_BACKENDS", "create_backend"]
