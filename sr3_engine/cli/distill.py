"""Distil a model into one that samples in a few deterministic steps (progressive distillation).

    python -m sr3_engine distill --teacher demo-x4 --out runs/fast --steps 4 --data data/demo/train --hr-size 64
    python -m sr3_engine distill --out runs/fast --resume              # continue after a crash or a kill
    python -m sr3_engine distill --out runs/fast --resume --steps 1    # go on halving, to 2 then 1 step

Round after round a student, initialised from its teacher, learns to do in one DDIM step what
the teacher does in two (distillation.py), halving the steps from --teacher-steps down to
--steps; each round's student is the next round's teacher. --out holds distill.json (the
settings), round-1/, round-2/, ... (each a training run folder, training/checkpoint.py: model/
samples with DDIM at that round's steps by default) and, once the last round is done, model/:
the student, whose config.json makes DDIM with --steps steps its default. Each round is a
training run (`train.run_training`): the same data, EMA, checkpoints, DDP and exact resume, so a
killed run resumed with --resume ends bit for bit where an uninterrupted one would have.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

from ..distillation import distillation_loss, distillation_plans, student_sampler
from ..io import atomic_path
from ..runtime import model_dir
from ..schedules import NoiseSchedule
from ..training import checkpoint as ckpt
from ..training.data import DataError, usable_images
from ..training.trainer import Processes, loss_norm
from .common import EXIT_OK, EXIT_USAGE, UsageError, print_error, run_until_stopped
from .train import (add_run_flags, check_numbers, check_run_args, command_parser, processes, resume_args,
                    run_training)

SETTINGS_FILE = "distill.json"
# Flags that define the run; --steps is not one: a smaller power-of-two fraction only adds rounds.
DISTILL_DEFINING = ("teacher", "teacher_steps", "round_steps", "hr_size", "batch_size", "lr", "weight_decay",
                    "warmup_steps", "ema_decay", "loss", "seed", "grad_clip", "blur_sigma", "op_backend")


def build_parser(with_defaults: bool = True) -> argparse.ArgumentParser:
    parser, add = command_parser("python -m sr3_engine distill",
                                 "Distil a model into a student that samples in --steps DDIM steps.", with_defaults)
    add("--teacher", help="the model to distil: a model directory or a bundled model's name")
    add("--out", required=with_defaults, help=f"output folder: {SETTINGS_FILE}, round-K/ per round, model/ at the end")
    add("--steps", 4, type=int, help="network evaluations of the final student (DDIM steps)")
    add("--teacher-steps", None, type=int, help="DDIM steps of the teacher that the first round halves, --steps "
        "times a power of two (default: the largest not above the teacher's schedule)")
    add("--round-steps", 2000, type=int, help="optimiser steps of each round")
    add_run_flags(add, lr=1e-4, warmup_steps=50, ema_decay=0.999, loss="l2", save_every=250)
    return parser


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, set[str]]:
    args = build_parser().parse_args(argv)
    return args, set(vars(build_parser(with_defaults=False).parse_args(argv)))


def settings(argv: list[str] | None) -> argparse.Namespace:
    """The run's settings: the flags of a new run (written to distill.json), or the saved ones
    with the flags that may change applied on top."""
    args, explicit = parse_args(argv)
    path = Path(args.out) / SETTINGS_FILE
    if args.resume:
        if not path.is_file():
            raise UsageError(f"{path}: no distillation to resume")
        try:
            saved = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as error:
            raise UsageError(f"{path}: not readable JSON ({error})") from None
        args = resume_args(saved, args, explicit, path, DISTILL_DEFINING)
    elif path.exists():
        raise UsageError(f"{path}: exists; pass --resume to continue that run or pick another --out")
    if not args.teacher:
        raise UsageError("--teacher is required")
    if not args.data:
        raise UsageError("--data is required")
    check_numbers(args, positive=("steps", "round_steps"), non_negative=())
    return args


def round_steps_list(teacher_steps: int, steps: int) -> list[int]:
    """The students' step counts, round by round: teacher_steps / 2, / 4, ... down to `steps`."""
    rounds = []
    while teacher_steps > steps and teacher_steps % 2 == 0:
        teacher_steps //= 2
        rounds.append(teacher_steps)
    if not rounds or rounds[-1] != steps:
        raise UsageError(f"--teacher-steps must be --steps ({steps}) times a power of two (2, 4, 8, ...)")
    return rounds


def default_teacher_steps(steps: int, schedule_steps: int) -> int:
    """The largest steps x 2^k (k >= 1) not above the teacher's schedule."""
    teacher_steps = 2 * steps
    if teacher_steps > schedule_steps:
        raise UsageError(f"--steps {steps}: the teacher's schedule has {schedule_steps} steps, fewer than two per "
                         "student step")
    while 2 * teacher_steps <= schedule_steps:
        teacher_steps *= 2
    return teacher_steps


def round_dir(out: Path, index: int) -> Path:
    return out / f"round-{index}"


def distill(argv: list[str] | None = None) -> Path:
    """Run (or resume) distillation from command-line arguments; returns the student's model directory."""
    args = settings(argv)
    out = Path(args.out)
    try:
        teacher_dir = model_dir.resolve(args.teacher)
        spec = model_dir.read_spec(teacher_dir)
    except (OSError, ValueError) as error:
        raise UsageError(f"--teacher: {error}") from None
    schedule = NoiseSchedule.from_config(spec.schedule)
    if args.teacher_steps is None:
        args.teacher_steps = default_teacher_steps(args.steps, spec.schedule.steps)
    if args.teacher_steps > spec.schedule.steps:
        raise UsageError(f"--teacher-steps {args.teacher_steps} is more than the teacher's schedule's "
                         f"{spec.schedule.steps} steps")
    rounds = round_steps_list(args.teacher_steps, args.steps)
    train_schedule = NoiseSchedule.from_config(spec.train_schedule or spec.schedule)
    with processes(args) as procs:
        round_args = round_arguments(args, out, 1, spec)
        check_run_args(round_args, spec.model, procs.device)
        paths = usable_images(Path(args.data), args.hr_size, warn=procs.is_main)
        if procs.is_main:
            out.mkdir(parents=True, exist_ok=True)
            with atomic_path(out / SETTINGS_FILE) as tmp:
                tmp.write_text(json.dumps({k: v for k, v in vars(args).items() if k != "resume"}, indent=2) + "\n")
        teacher = teacher_dir
        for index, student_steps in enumerate(rounds, start=1):
            round_args = round_arguments(args, out, index, spec)
            state_path = Path(round_args.out) / ckpt.STATE_FILE
            state = ckpt.load_state(state_path) if state_path.is_file() else None
            if state is None or state["step"] < args.round_steps:
                if procs.is_main:
                    print(f"sr3_engine: distill round {index} of {len(rounds)}: {2 * student_steps} -> "
                          f"{student_steps} steps (teacher {teacher})", file=sys.stderr)
                distill_round(round_args, state, teacher, student_steps, schedule, train_schedule, spec, paths, procs)
            teacher = Path(round_args.out) / ckpt.MODEL_DIR
        if procs.is_main:
            student, student_spec = model_dir.load(teacher)
            model_dir.replace(out / ckpt.MODEL_DIR, student.state_dict(), student_spec, tag="final")
        procs.barrier()
    return out / ckpt.MODEL_DIR


def round_arguments(args: argparse.Namespace, out: Path, index: int, spec: model_dir.ModelSpec) -> argparse.Namespace:
    """The training-run arguments of round `index`: the settings, that round's folder, length and
    learning-rate decay to 0 (the paper anneals the rate within each round), the teacher's scale
    and resampler, no validation."""
    values = {k: v for k, v in vars(args).items() if k not in ("steps", "out", "resume")}
    return argparse.Namespace(**values, out=str(round_dir(out, index)), steps=args.round_steps,
                              lr_decay_steps=max(0, args.round_steps - args.warmup_steps), scale=spec.scale,
                              resampler=spec.resampler, val_data=None, val_every=0, val_count=0)


def distill_round(args: argparse.Namespace, state: dict[str, Any] | None, teacher_dir: Path, steps: int,
                  schedule: NoiseSchedule, train_schedule: NoiseSchedule, spec: model_dir.ModelSpec,
                  paths: list[Path], procs: Processes) -> None:
    """One round: a student of `steps` steps from the teacher in `teacher_dir`, started from its
    weights or resumed from `state`."""
    teacher, _ = model_dir.load(teacher_dir)
    teacher = teacher.to(procs.device).eval().requires_grad_(False)
    if state is not None and "op_backend_used" in state["args"]:
        args.op_backend_used = state["args"]["op_backend_used"]
    clip = spec.sampler.clip
    plans = distillation_plans(schedule, steps, spec.model.prediction, spec.model.residual_scale, clip)
    objective = functools.partial(distillation_loss, teacher=teacher, plans=plans, p=loss_norm(args))
    run_training(args, spec.model, procs, (train_schedule, schedule.respaced(steps)), state, paths, [],
                 None if state is not None else teacher.state_dict(), objective=objective,
                 sampler=student_sampler(clip))


def main(argv: Sequence[str] | None = None) -> int:
    return run_until_stopped(lambda: run(argv))


def run(argv: Sequence[str] | None) -> int:
    try:
        distill(list(argv) if argv is not None else None)
    except (UsageError, DataError, ckpt.CheckpointError) as error:
        print_error(str(error).strip().splitlines()[-1])
        return EXIT_USAGE
    return EXIT_OK
