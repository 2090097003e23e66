"""Train SR3 on a folder of images, alone or under torchrun.

    python -m sr3_engine train --data imgs/ --out runs/a --config sr3-16-128 --scale 8 --hr-size 128
    torchrun --nproc_per_node 8 -m sr3_engine train --data imgs/ --out runs/a ...
    python -m sr3_engine train --out runs/a --resume        # continue after a crash or a kill

A resumed run ends with the same weights, bit for bit, as one that never stopped (on CPU,
or on CUDA with --deterministic); training/trainer.py says why. --resume takes every setting from
the saved run; only flags that do not change what is computed (length, cadence, data
location, device, workers) may be given again with new values.

The saved model holds the EMA weights with the short inference schedule (--sample-*):
the network is conditioned on the noise level, not the step, so it samples well with far
fewer steps than the training schedule has. training/checkpoint.py describes the output folder.
Bad arguments or data end with one line `error: ...` and exit code 2; Ctrl-C and SIGTERM with
one line and exit codes 130 and 143, leaving no temporary file behind (those of a killed
run are swept when the next one starts).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.distributed as dist

from .. import metrics
from ..config import NAMED_UNET_CONFIGS, PREDICTIONS, SCHEDULE_KINDS, ScheduleConfig, UNetConfig
from ..io import sweep_temporaries
from ..ops import OP_BACKENDS
from ..runtime import model_dir
from ..resize import RESAMPLERS
from ..samplers import SamplerConfig
from ..schedules import NoiseSchedule
from ..training import checkpoint as ckpt
from ..training.data import DataError, fingerprint, load_centre_crops, print_warning, usable_images
from ..training.trainer import (AMP_DTYPES, Objective, Processes, Run, build_run, finish, start_processes,
                                train_loop)
from .common import EXIT_OK, EXIT_USAGE, UsageError, parse_device, print_error, run_until_stopped

# Flags that define the run: resuming with a different value would be another run.
RUN_DEFINING = ("config", "prediction", "residual_scale", "init_from", "scale", "hr_size", "batch_size", "lr",
                "weight_decay", "warmup_steps", "lr_decay_steps", "ema_decay", "loss", "seed", "grad_clip",
                "blur_sigma", "resampler", "schedule", "schedule_steps", "beta_start", "beta_end", "sample_steps",
                "sample_beta_start", "sample_beta_end", "op_backend")


Adder = Callable[..., None]


def command_parser(prog: str, description: str, with_defaults: bool) -> tuple[argparse.ArgumentParser, Adder]:
    """A parser and its `add(flag, default, **kwargs)`; without defaults, parsing yields only the
    flags given explicitly (for --resume)."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                     argument_default=None if with_defaults else argparse.SUPPRESS)

    def add(flag: str, default: Any = None, **kwargs: Any) -> None:
        if with_defaults:
            kwargs["default"] = default
        parser.add_argument(flag, **kwargs)

    return parser, add


def add_run_flags(add: Adder, *, lr: float, warmup_steps: int, ema_decay: float, loss: str, save_every: int) -> None:
    """The flags of a training run that distillation shares: data, optimiser, EMA, seed, device,
    cadence and --resume."""
    add("--data", help="folder of training images, searched recursively")
    add("--hr-size", 128, type=int, help="side of the square HR training crops; smaller images are skipped")
    add("--batch-size", 16, type=int, help="images per step per process")
    add("--lr", lr, type=float, help="AdamW learning rate after warm-up")
    add("--weight-decay", 0.0, type=float, help="AdamW decoupled weight decay")
    add("--warmup-steps", warmup_steps, type=int, help="linear learning-rate warm-up steps")
    add("--ema-decay", ema_decay, type=float, help="EMA decay (ramped up as min(decay, (1+s)/(10+s)))")
    add("--loss", loss, choices=("l1", "l2"), help="norm p of the loss")
    add("--grad-clip", 1.0, type=float, help="max global gradient norm; 0 disables clipping")
    add("--blur-sigma", 0.0, type=float, help="max sigma of a random Gaussian blur of the LR input; 0 = off")
    add("--seed", 0, type=int, help="seeds every random choice of the run")
    add("--amp", "auto", choices=("auto", "none", "bf16", "fp16"), help="CUDA autocast (auto: bf16 on CUDA)")
    add("--op-backend", "auto", choices=("auto",) + OP_BACKENDS,
        help="GroupNorm+SiLU kernels of the training network (auto: of those `auto` would use here, the one "
        "whose training pass is fastest, measured at the start and kept on resume)")
    add("--device", "auto", help="cpu, cuda, cuda:N (auto: cuda when available; torchrun: cuda:LOCAL_RANK)")
    add("--num-workers", None, type=int, help="DataLoader workers per process (default: 0 on CPU, up to 4 on CUDA)")
    add("--save-every", save_every, type=int, help="checkpoint every N steps (and at the end); 0 = only at the end")
    add("--log-every", 50, type=int, help="write a log record every N steps")
    add("--deterministic", False, action="store_true",
        help="deterministic CUDA kernels where PyTorch has them (exact resume on GPU)")
    add("--resume", False, action="store_true", help="continue the run in --out from where it stopped")


def build_parser(with_defaults: bool = True) -> argparse.ArgumentParser:
    """The CLI. Without defaults, parsing yields only the flags given explicitly (for --resume)."""
    parser, add = command_parser("python -m sr3_engine train",
                                 "Train SR3 on a folder of images, alone or under torchrun.", with_defaults)
    add_run_flags(add, lr=1e-4, warmup_steps=10_000, ema_decay=0.9999, loss="l1", save_every=5000)
    add("--steps", 1_000_000, type=int, help="total optimiser steps of the run")
    add("--val-data", help="folder of validation images (centre crops); omit to skip validation")
    add("--out", required=with_defaults, help="output folder: model/, state.pt, log.jsonl")
    add("--config", "sr3-16-128", help=f"U-Net: a named config ({', '.join(NAMED_UNET_CONFIGS)}) or a JSON file")
    add("--prediction", None, choices=PREDICTIONS,
        help="what the network's output estimates (default: the config's, eps when it has none)")
    add("--residual-scale", None, type=float,
        help="diffuse the residual over the upsampled input, times this factor, instead of the image "
        "(default: the config's, the image when it has none)")
    add("--init-from", None, help="start from this model directory's weights (fine-tuning; its architecture "
        "must be --config's, its prediction target and residual scale may differ)")
    add("--scale", 8, type=int, help="super-resolution factor")
    add("--lr-decay-steps", 0, type=int, help="after the warm-up, a half cosine from --lr to 0 over this many "
        "steps (0: constant)")
    add("--resampler", "bicubic", choices=RESAMPLERS, help="how the condition is upsampled; saved with the model "
        "and used whenever it is served (pil-bicubic: Pillow's, on 8-bit levels)")
    add("--val-every", 5000, type=int, help="validate every N steps (and at the end); 0 = only at the end")
    add("--val-count", 4, type=int, help="validation images to sample")
    add("--schedule", "linear", choices=SCHEDULE_KINDS, help="training noise schedule")
    add("--schedule-steps", 2000, type=int, help="training schedule length T")
    add("--beta-start", 1e-6, type=float, help="training schedule first beta")
    add("--beta-end", 1e-2, type=float, help="training schedule last beta")
    add("--sample-steps", 100, type=int, help="steps of the linear inference schedule saved with the model")
    add("--sample-beta-start", 1e-4, type=float, help="inference schedule first beta")
    add("--sample-beta-end", 0.1, type=float, help="inference schedule last beta")
    return parser


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, set[str]]:
    """The parsed arguments and the names of the flags given explicitly."""
    args = build_parser().parse_args(argv)
    explicit = set(vars(build_parser(with_defaults=False).parse_args(argv)))
    return args, explicit


def resume_args(saved: dict[str, Any], given: argparse.Namespace, explicit: set[str], path: Path,
                defining: Sequence[str] = RUN_DEFINING) -> argparse.Namespace:
    """The saved run's arguments, with the explicitly given flags that may change (length,
    cadence, data location, device) applied on top; those in `defining` may not."""
    values = vars(given)
    changed = sorted(name for name in explicit & set(defining) if values[name] != saved.get(name))
    if changed:
        flags = ", ".join(f"--{name.replace('_', '-')}" for name in changed)
        raise UsageError(f"{path}: {flags} differ from the saved run; resuming continues that run as it was")
    merged = {**values, **saved, **{name: values[name] for name in explicit}}
    return argparse.Namespace(**merged)


def model_config(value: str) -> UNetConfig:
    if value in NAMED_UNET_CONFIGS:
        return UNetConfig.named(value)
    path = Path(value)
    if not path.is_file():
        raise UsageError(f"--config {value!r}: not a named config ({', '.join(NAMED_UNET_CONFIGS)}) nor a JSON file")
    try:
        document = json.loads(path.read_text())
        if not isinstance(document, dict):
            raise ValueError(f"expected a JSON object, got {type(document).__name__}")
        return UNetConfig.from_dict(document)
    except (ValueError, TypeError, UnicodeDecodeError) as error:
        raise UsageError(f"{path}: not a UNetConfig JSON object ({error})") from None


def check_args(args: argparse.Namespace, config: UNetConfig, device: torch.device) -> None:
    check_numbers(args, positive=("scale", "val_count", "schedule_steps", "sample_steps"),
                  non_negative=("steps", "lr_decay_steps", "val_every"))
    check_run_args(args, config, device)
    if args.val_data and args.hr_size < metrics.SSIM_MIN_SIZE:
        raise UsageError(f"--hr-size must be >= {metrics.SSIM_MIN_SIZE} for validation SSIM; got {args.hr_size}")


def check_numbers(args: argparse.Namespace, *, positive: Sequence[str], non_negative: Sequence[str]) -> None:
    for name in positive:
        if getattr(args, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive; got {getattr(args, name)}")
    for name in non_negative:
        if getattr(args, name) < 0:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 0; got {getattr(args, name)}")


def check_run_args(args: argparse.Namespace, config: UNetConfig, device: torch.device) -> None:
    """The checks of `add_run_flags`' flags (and of --scale, which distillation takes from its teacher)."""
    check_numbers(args, positive=("hr_size", "batch_size", "log_every"),
                  non_negative=("warmup_steps", "grad_clip", "blur_sigma", "seed", "save_every",
                                "weight_decay"))
    if args.lr <= 0 or not 0.0 <= args.ema_decay < 1.0:
        raise UsageError(f"need --lr > 0 and 0 <= --ema-decay < 1; got {args.lr} and {args.ema_decay}")
    for multiple, what in ((args.scale, "--scale"), (config.size_multiple, "the model's size multiple")):
        if args.hr_size % multiple:
            raise UsageError(f"--hr-size {args.hr_size} is not divisible by {what} ({multiple})")
    if args.amp in AMP_DTYPES and device.type != "cuda":
        raise UsageError(f"--amp {args.amp} needs a CUDA device; got {device}")
    if args.num_workers is not None and args.num_workers < 0:
        raise UsageError(f"--num-workers must be >= 0; got {args.num_workers}")


def schedules(args: argparse.Namespace) -> tuple[NoiseSchedule, NoiseSchedule]:
    """(training schedule, inference schedule saved with the model)."""
    try:
        train = ScheduleConfig(args.schedule, args.schedule_steps, args.beta_start, args.beta_end)
        sample = ScheduleConfig("linear", args.sample_steps, args.sample_beta_start, args.sample_beta_end)
    except ValueError as error:
        raise UsageError(str(error)) from None
    return NoiseSchedule.from_config(train), NoiseSchedule.from_config(sample)


def prepare(argv: list[str] | None) -> tuple[argparse.Namespace, UNetConfig, dict[str, Any] | None]:
    args, explicit = parse_args(argv)
    out = Path(args.out)
    state = None
    if args.resume:
        state = ckpt.load_state(out / ckpt.STATE_FILE)
        args = resume_args(state["args"], args, explicit, out / ckpt.STATE_FILE)
        config = UNetConfig.from_dict(state["model_config"])
    else:
        if (out / ckpt.STATE_FILE).exists():
            raise UsageError(f"{out / ckpt.STATE_FILE}: exists; pass --resume to continue that run "
                             "or pick another --out")
        config = model_config(args.config)
        if args.prediction is not None:
            config = dataclasses.replace(config, prediction=args.prediction)
        if args.residual_scale is not None:
            config = dataclasses.replace(config, residual_scale=args.residual_scale)
    if not args.data:
        raise UsageError("--data is required")
    return args, config, state


def train(argv: list[str] | None = None) -> Run:
    """Run (or resume) training from command-line arguments; returns the finished run."""
    args, config, state = prepare(argv)
    with processes(args) as procs:
        check_args(args, config, procs.device)
        paths = usable_images(Path(args.data), args.hr_size, warn=procs.is_main)
        val_paths = (usable_images(Path(args.val_data), args.hr_size, warn=procs.is_main)[:args.val_count]
                     if args.val_data else [])
        return run_training(args, config, procs, schedules(args), state, paths, val_paths,
                            initial_weights(args.init_from, config) if state is None and args.init_from else None)


@contextlib.contextmanager
def processes(args: argparse.Namespace) -> Iterator[Processes]:
    """This process, or this rank of a torchrun job, on --device; the process group is ended on the way out."""
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    procs = start_processes(parse_device(args.device, local_rank=int(os.environ.get("LOCAL_RANK", "0"))))
    try:
        yield procs
    finally:
        if procs.world_size > 1:
            dist.destroy_process_group()


def run_training(args: argparse.Namespace, config: UNetConfig, procs: Processes,
                 run_schedules: tuple[NoiseSchedule, NoiseSchedule], state: dict[str, Any] | None,
                 paths: list[Path], val_paths: list[Path], initial: dict[str, torch.Tensor] | None, *,
                 objective: Objective | None = None, sampler: SamplerConfig = SamplerConfig()) -> Run:
    """Build the run (`trainer.build_run`), train it in --out to --steps with its log and
    checkpoints, and return it: what `train` and each round of `distill` do."""
    run = build_run(args, config, procs, run_schedules, state, initial, objective=objective, sampler=sampler)
    run.data_fingerprint = fingerprint(Path(args.data), paths)
    if state is not None and procs.is_main:
        warn_if_data_changed(run, state)
    log = start_log(run)
    try:
        val_hr = load_centre_crops(val_paths, args.hr_size) if val_paths and procs.is_main else None
        train_loop(run, paths, val_hr, log)
        finish(run, log)
    finally:
        if log is not None:
            log.close()
    return run


def initial_weights(name_or_path: str, config: UNetConfig) -> dict[str, torch.Tensor]:
    """The weights of a model directory whose network is `config`'s (prediction target and
    residual scale aside: neither changes a parameter)."""
    try:
        directory = model_dir.resolve(name_or_path)
        spec = model_dir.read_spec(directory)
        same_network = dataclasses.replace(spec.model, prediction=config.prediction,
                                           residual_scale=config.residual_scale)
        if same_network != config:
            raise ValueError(f"{directory}: its network is not --config's; --init-from needs the same architecture")
        return model_dir.read_weights(directory, config)
    except (OSError, ValueError) as error:
        raise UsageError(f"--init-from: {error}") from None


def warn_if_data_changed(run: Run, state: dict[str, Any]) -> None:
    # The sample stream is defined by the image list; with another list the run goes on,
    # but it is no longer the run that was saved.
    if state.get("data_fingerprint") not in (None, run.data_fingerprint):
        print_warning(f"the images under {run.args.data} changed since the checkpoint; "
                      "training continues on the new set")


def start_log(run: Run) -> ckpt.JsonlLog | None:
    """Rank 0's log. Records after the step the run starts from (all of them for a fresh run)
    come from a process that never reached its next checkpoint, and are dropped; so are the
    temporary files and model directories a killed process left."""
    if not run.procs.is_main:
        return None
    run.out.mkdir(parents=True, exist_ok=True)
    sweep_temporaries(run.out)
    model_dir.recover(run.out / ckpt.MODEL_DIR)
    ckpt.truncate_log(run.out / ckpt.LOG_FILE, run.step)
    return ckpt.JsonlLog(run.out / ckpt.LOG_FILE)


def main(argv: Sequence[str] | None = None) -> int:
    return run_until_stopped(lambda: run(argv))


def run(argv: Sequence[str] | None) -> int:
    try:
        train(list(argv) if argv is not None else None)
    except (UsageError, DataError, ckpt.CheckpointError) as error:
        # DataLoader workers re-raise with the worker's traceback in the message; its last line is the error.
        print_error(str(error).strip().splitlines()[-1])
        return EXIT_USAGE
    return EXIT_OK
