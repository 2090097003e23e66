"""Export the denoiser to ONNX (and optionally a TensorRT plan), checked against PyTorch.

    python -m sr3_engine export --model demo-x4 --onnx denoiser.onnx [--dtype fp16] [--trt denoiser.plan]

The library behind it is `runtime/onnx_export.py`, which says what the graph holds and how
the check works. Exit codes: 0 ok, 1 the check failed, 2 bad arguments or an environment
that cannot do what was asked (the message says which).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from ..runtime import model_dir
from ..runtime.backends import BackendUnavailableError
from ..runtime.backends.tensorrt import build_engine, import_tensorrt
from ..runtime.engine import PRECISIONS
from ..runtime.onnx_export import (DEFAULT_OPSET, TOLERANCE, ExportError, check_opset, check_shapes, export_onnx,
                                   max_abs_error, require)
from .common import EXIT_FAILED, EXIT_OK, EXIT_USAGE, add_dtype_argument, print_error


def parse_shape(text: str) -> tuple[int, int, int]:
    """'BxHxW' -> (B, H, W)."""
    parts = text.lower().split("x")
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"expected BxHxW with positive integers (e.g. 1x128x128); got {text!r}")
    return int(parts[0]), int(parts[1]), int(parts[2])


def _check_writable(path: Path) -> None:
    if path.is_dir():
        raise ExportError(f"{path}: is a directory; expected a file name")
    # Probe the nearest existing ancestor rather than create the output's folders now: a
    # later error must not leave empty folders behind.
    existing = next(p for p in (path.parent.absolute(), *path.parent.absolute().parents) if p.exists())
    try:
        if not existing.is_dir():
            raise NotADirectoryError(20, f"{existing} is not a directory")
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise ExportError(f"{path}: cannot write there ({error.strerror or error})") from None


def _describe_inputs(onnx_path: Path) -> list[str]:
    onnx = require("onnx", "ONNX export")
    model = onnx.load(str(onnx_path), load_external_data=False)
    lines = []
    for value in list(model.graph.input) + list(model.graph.output):
        dims = [d.dim_param or str(d.dim_value) for d in value.type.tensor_type.shape.dim]
        element = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type).name
        lines.append(f"{value.name}: {element}[{', '.join(dims)}]")
    return lines


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sr3_engine export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="model directory or bundled model name")
    parser.add_argument("--onnx", required=True, type=Path, help="output .onnx file")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    # A file's precision, not a machine's: the file may run anywhere, so no auto here.
    add_dtype_argument(parser, default="fp32", help="export precision")
    shape = parser.add_mutually_exclusive_group()
    shape.add_argument("--dynamic", dest="dynamic", action="store_true", default=True,
                       help="batch, height and width dynamic (default)")
    shape.add_argument("--static", dest="dynamic", action="store_false", help="fixed at the export example's shape")
    parser.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                        help="compare onnxruntime with PyTorch (default on)")
    parser.add_argument("--trt", type=Path, help="also build a TensorRT plan here (needs tensorrt and a GPU)")
    parser.add_argument("--min-shape", type=parse_shape, default=(1, 64, 64), help="TensorRT profile min BxHxW")
    parser.add_argument("--opt-shape", type=parse_shape, default=(1, 256, 256), help="TensorRT profile opt BxHxW")
    parser.add_argument("--max-shape", type=parse_shape, default=(4, 512, 512), help="TensorRT profile max BxHxW")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except ExportError as error:
        print_error(str(error))
        return EXIT_USAGE


def _run(args: argparse.Namespace) -> int:
    dtype = PRECISIONS[args.dtype]
    check_opset(args.opset)
    require("onnxscript", "ONNX export")
    if args.check:
        require("onnxruntime", "--check")
        if dtype == torch.bfloat16:
            raise ExportError("--dtype bf16 cannot be checked: onnxruntime's CPUExecutionProvider has no bfloat16 "
                              "kernels (e.g. Conv); pass --no-check")
    _check_writable(args.onnx)
    if args.trt is not None:
        _check_writable(args.trt)
        try:
            import_tensorrt()
        except BackendUnavailableError as error:
            raise ExportError(f"--trt: {error}") from None
    try:
        model, _ = model_dir.load(args.model)
    except (OSError, ValueError) as error:
        raise ExportError(str(error)) from None
    model = model.to("cpu", dtype).eval()

    stages = ["export", "onnx.checker"] + (["onnxruntime check"] if args.check else []) + \
        (["tensorrt build"] if args.trt else [])
    error = None
    with tqdm(total=len(stages), desc="export", unit="stage", file=sys.stderr) as bar:
        for stage in stages:
            bar.set_description(stage)
            if stage == "export":
                export_onnx(model, args.onnx, opset=args.opset, dynamic=args.dynamic)
            elif stage == "onnx.checker":
                onnx = require("onnx", "ONNX export")
                onnx.checker.check_model(str(args.onnx), full_check=True)
            elif stage == "onnxruntime check":
                error = max_abs_error(args.onnx, model, check_shapes(model, args.dynamic))
            else:
                build_engine(args.onnx.read_bytes(), args.trt, dtype, args.min_shape, args.opt_shape,
                             args.max_shape)
            bar.update(1)

    print(f"onnx:   {args.onnx} ({args.onnx.stat().st_size / 2**20:.1f} MiB, opset {args.opset}, {args.dtype}, "
          f"{'dynamic' if args.dynamic else 'static'})")
    for line in _describe_inputs(args.onnx):
        print(f"  {line}")
    if args.trt:
        print(f"tensorrt: {args.trt} (profile min {args.min_shape}, opt {args.opt_shape}, max {args.max_shape})")
    if error is None:
        print("check:  skipped")
        return 0
    shapes = ", ".join(f"{b}x{h}x{w}" for b, h, w in check_shapes(model, args.dynamic))
    print(f"check:  max |output_onnx - output_torch| = {error:.3g} at {shapes} (tolerance {TOLERANCE[dtype]:g})")
    if error > TOLERANCE[dtype]:
        print(f"check failed: max abs error {error:.3g} > {TOLERANCE[dtype]:g}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK
