"""ONNX export of the SR3 denoiser, as a library: `export_onnx` and the onnxruntime parity check.

The command around it is `python -m sr3_engine export` (cli/export.py); the onnxruntime and
tensorrt engine backends export through `export_onnx` too. The graph is the denoiser alone,
`(x_up, y_t, noise_level) -> output`, the output named after what it estimates (`eps`, `y0`
or `v`: the model's `UNetConfig.prediction`, `output_name`): the sampling loop, its noise and
its schedule stay in the
engine, so one file serves every schedule, sampler and step count, and the same generator
seed gives the same noise on every backend.

It uses the dynamo exporter (torch.export + onnxscript) because the TorchScript exporter
decomposes GroupNorm into Reshape + InstanceNormalization; at opset >= 21 the dynamo
exporter writes each GroupNorm as one GroupNormalization node, which onnxruntime and
TensorRT run as one fused kernel. GroupNormalization exists from opset 18 (with per-group
scale and bias, replaced by per-channel ones in 21), so an older opset is refused.
Every GroupNorm+SiLU is exported through the `native` op backend (F.group_norm + F.silu):
the fused C++/Triton kernels have no ONNX form.

The check runs the file with onnxruntime on the CPU at two batch sizes and two resolutions
that differ from the export example (so a dimension that was silently specialised fails it)
and compares the output with eager PyTorch in the same dtype; `TOLERANCE` is the max abs error
allowed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.nn as nn

from ..diffusion import model_prediction
from ..io import atomic_path
from ..unet import GroupNormSiLU

INPUT_NAMES = ("x_up", "y_t", "noise_level")
MIN_OPSET = 18  # GroupNormalization's first version
DEFAULT_OPSET = 21  # GroupNormalization with per-channel scale/bias, as torch's GroupNorm
# Max abs error on the output; fp16 rounds every activation to 11 bits, so its bound is looser.
TOLERANCE = {torch.float32: 1e-3, torch.float16: 3e-2}
# A protobuf cannot exceed 2 GiB; larger weights would need ONNX external data files.
MAX_INLINE_BYTES = 2**31 - 2**24


class ExportError(ValueError):
    """An export the caller asked for cannot be done; the message says why in one line."""


def require(module: str, feature: str):
    """Import an optional dependency or say in one line how to install it."""
    try:
        return __import__(module)
    except ImportError:
        raise ExportError(f"{feature} needs {module}, which is not installed "
                          "(pip install 'sr3_engine[export]')") from None


def check_opset(opset: int) -> None:
    if opset < MIN_OPSET:
        raise ExportError(f"opset {opset} is too old for GroupNormalization (needs >= {MIN_OPSET})")
    newest = require("onnx", "ONNX export").defs.onnx_opset_version()
    if opset > newest:
        raise ExportError(f"opset {opset} is newer than the installed onnx supports (<= {newest})")


def example_size(model: nn.Module) -> int:
    """Height and width of the export example: a small valid size, distinct from the check's."""
    config = getattr(model, "config", None)
    multiple = config.size_multiple if config is not None else 1
    return max(16, 2 * multiple)


@contextlib.contextmanager
def _native_group_norm(model: nn.Module) -> Iterator[None]:
    modules = [m for m in model.modules() if isinstance(m, GroupNormSiLU)]
    saved = [m.backend for m in modules]
    for module in modules:
        module.backend = "native"
    try:
        yield
    finally:
        for module, backend in zip(modules, saved):
            module.backend = backend


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    # The exporter logs every optional op library it cannot find (torchvision) and warns
    # about its own deprecations; neither concerns the user of this command.
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def example_inputs(batch: int, height: int, width: int, dtype: torch.dtype, device: torch.device | str = "cpu",
                   seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x_up = torch.rand(batch, 3, height, width, generator=generator) * 2 - 1
    y_t = torch.randn(batch, 3, height, width, generator=generator)
    # The engine always feeds noise levels in float32, whatever the model's dtype.
    level = torch.rand(batch, generator=generator)
    return x_up.to(device, dtype), y_t.to(device, dtype), level.to(device)


def output_name(model: nn.Module) -> str:
    """The graph output's name: the model's prediction target (`diffusion.model_prediction`)."""
    return model_prediction(model)


def export_onnx(model: nn.Module, path: str | os.PathLike, *, opset: int = DEFAULT_OPSET,
                dynamic: bool = True) -> Path:
    """Write `model` (already in its export dtype, on the CPU or a GPU) to `path` atomically.
    Dynamic axes are named batch, height and width."""
    require("onnxscript", "ONNX export")
    check_opset(opset)
    param = next(model.parameters())
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    if size > MAX_INLINE_BYTES:
        raise ExportError(f"the weights are {size / 2**30:.1f} GiB; ONNX files over 2 GiB need external data, "
                          "which this exporter does not write (export in fp16)")
    side = example_size(model)
    inputs = example_inputs(1, side, side, param.dtype, param.device)
    dynamic_shapes = None
    if dynamic:
        dim = torch.export.Dim.DYNAMIC
        image = {0: dim, 2: dim, 3: dim}
        dynamic_shapes = {"x_up": image, "y_t": image, "noise_level": {0: dim}}
    with _native_group_norm(model), _quiet_exporter(), torch.no_grad():
        program = torch.onnx.export(model.eval(), inputs, None, input_names=list(INPUT_NAMES),
                                    output_names=[output_name(model)], opset_version=opset, dynamo=True,
                                    dynamic_shapes=dynamic_shapes, verbose=False)
        if dynamic:
            shape = program.model.graph.inputs[0].shape
            program.rename_axes({shape[0]: "batch", shape[2]: "height", shape[3]: "width"})
            # The output has x_up's shape; the tracer only knows it as an expression of the padding arithmetic.
            program.model.graph.outputs[0].shape = program.model.graph.inputs[0].shape
        with atomic_path(path) as tmp:
            program.save(tmp, external_data=False)
    return Path(path)


def check_shapes(model: nn.Module, dynamic: bool) -> list[tuple[int, int, int]]:
    """(batch, height, width) to check at: two batches and two resolutions unlike the example."""
    side = example_size(model)
    if not dynamic:
        return [(1, side, side)]
    step = getattr(getattr(model, "config", None), "size_multiple", 1)
    return [(2, side + step, side + 2 * step), (3, side + 2 * step, side + step)]


def max_abs_error(onnx_path: str | os.PathLike, model: nn.Module, shapes: Sequence[tuple[int, int, int]]) -> float:
    """Largest |output_onnxruntime - output_pytorch| over `shapes`, on the CPU in the model's dtype."""
    ort = require("onnxruntime", "the onnxruntime check")
    dtype = next(model.parameters()).dtype
    if dtype == torch.bfloat16:
        raise ExportError("bf16 cannot be checked here: onnxruntime's CPUExecutionProvider has no bfloat16 "
                          "kernels (e.g. Conv); pass --no-check")
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    worst = 0.0
    model = model.to("cpu").eval()
    with _native_group_norm(model), torch.no_grad():
        for seed, (batch, height, width) in enumerate(shapes):
            inputs = example_inputs(batch, height, width, dtype, seed=seed)
            (output,) = session.run([output_name(model)], {n: t.numpy() for n, t in zip(INPUT_NAMES, inputs)})
            reference = model(*inputs).float()
            worst = max(worst, float((torch.from_numpy(output).float() - reference).abs().max()))
    return worst
