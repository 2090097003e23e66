"""The training machinery behind `python -m sr3_engine.train` and each round of `distill`: one
step of the run's objective, EMA, validation, checkpoints, and the loop, for a single process or
one rank of a torchrun job.

Resume is exact because no random draw depends on history. The data (image order,
crops, flips, blur) is a function of the seed and each sample's position in the run
(data.py); the noise levels, noise and dropout of step s on rank r come from generators
re-seeded from (seed, rank, s) at the start of that step. A checkpoint therefore records
the step and the data position instead of generator states: that is the complete RNG
state, it is the same on every rank, and it stays valid when the number of DataLoader
workers changes. With DDP every rank applies the same averaged gradients, so the ranks'
weights stay identical; the run checks that at the end with a checksum per rank.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import hashlib
import itertools
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from .. import metrics, ops
from ..config import UNetConfig
from ..diffusion import condition, diffusion_loss, output_image
from ..runtime import model_dir
from ..samplers import SamplerConfig, sample
from ..schedules import NoiseSchedule
from ..unet import SR3UNet, set_op_backend
from . import checkpoint as ckpt
from .data import CropDataset, StreamBatchSampler, derive_seed, make_loader, make_lr

# A test hook: the process SIGKILLs itself right after its Nth checkpoint (counted over every run
# it trains: distillation trains one per round), so a test can "crash" at an exact, known point.
KILL_AFTER_SAVE_ENV = "SR3_ENGINE_TRAIN_KILL_AFTER_SAVE"
_saves = itertools.count(1)
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# What a step minimises: objective(net, x_up, y0, generator=...) -> loss, every random draw from
# the generator (the diffusion loss of training, or distillation's).
Objective = Callable[..., torch.Tensor]


@dataclasses.dataclass(frozen=True)
class Processes:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def start_processes(device: torch.device) -> Processes:
    """One process alone, or one rank of a torchrun job (WORLD_SIZE > 1): nccl on CUDA, gloo on CPU."""
    world_size, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    return Processes(rank, world_size, device)


@dataclasses.dataclass
class Run:
    """Everything a training step touches. `model` is the bare network, `net` what is
    called (the DDP wrapper under torchrun); `sampler` is the default sampler saved with the model."""

    args: argparse.Namespace
    procs: Processes
    config: UNetConfig
    model: SR3UNet
    net: nn.Module
    ema: SR3UNet
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    train_schedule: NoiseSchedule
    inference_schedule: NoiseSchedule
    noise: torch.Generator
    amp_dtype: torch.dtype | None
    objective: Objective
    sampler: SamplerConfig
    step: int = 0
    data_position: int = 0
    data_fingerprint: str = ""

    @property
    def out(self) -> Path:
        return Path(self.args.out)


def amp_dtype(args: argparse.Namespace, device: torch.device) -> torch.dtype | None:
    if args.amp == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    return AMP_DTYPES.get(args.amp)


def lr_factor(warmup_steps: int, decay_steps: int, step: int) -> float:
    """The learning rate over --lr at optimiser step `step`: a linear warm-up, then constant or,
    with decay steps, a half cosine from 1 to 0 over that many steps after the warm-up (ending a
    fine-tuning run at a low rate lets the weights settle instead of hopping between minima)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if not decay_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def loss_norm(args: argparse.Namespace) -> int:
    """p of the loss's mean |f - target|^p."""
    return 1 if args.loss == "l1" else 2


def diffusion_objective(args: argparse.Namespace, config: UNetConfig, schedule: NoiseSchedule) -> Objective:
    """Training's objective: the diffusion loss (eq. 6) in the model's target and level space."""
    # The DDP wrapper hides model.config, so the noise-level space and target are passed explicitly.
    return functools.partial(diffusion_loss, schedule=schedule, p=loss_norm(args),
                             level_space=config.noise_level_input, prediction=config.prediction)


def build_run(args: argparse.Namespace, config: UNetConfig, procs: Processes,
              schedules: tuple[NoiseSchedule, NoiseSchedule], state: dict[str, Any] | None,
              initial_weights: dict[str, torch.Tensor] | None = None, *, objective: Objective | None = None,
              sampler: SamplerConfig = SamplerConfig()) -> Run:
    """A fresh run seeded from --seed (starting from `initial_weights` when given: fine-tuning),
    or the run saved in `state`; it minimises `objective` (default: `diffusion_objective`) and
    saves its model with `sampler` as the default."""
    device = procs.device
    torch.manual_seed(derive_seed(args.seed, "init"))
    model = SR3UNet(config)
    if initial_weights is not None:
        model.load_state_dict(initial_weights)
    model = model.to(device)
    if "op_backend_used" not in vars(args):
        # A resumed run saved before the pick was recorded trained with the ops' own `auto`.
        args.op_backend_used = "auto" if state is not None else training_op_backend(args, model, schedules[0], procs)
    set_op_backend(model, args.op_backend_used)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, functools.partial(lr_factor, args.warmup_steps, args.lr_decay_steps))
    dtype = amp_dtype(args, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    train_schedule, inference_schedule = schedules
    if objective is None:
        objective = diffusion_objective(args, config, train_schedule)
    run = Run(args, procs, config, model, model, ema, optimizer, scheduler, scaler, train_schedule,
              inference_schedule, torch.Generator(device), dtype, objective, sampler)
    if state is not None:
        restore(run, state)
    if procs.world_size > 1:
        run.net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return run


def training_op_backend(args: argparse.Namespace, model: SR3UNet, schedule: NoiseSchedule,
                        procs: Processes) -> str:
    """The GroupNorm+SiLU op backend a new run trains with: the one --op-backend names, or for
    `auto` the candidate of the ops' `auto` whose training pass (loss, forward and backward, on
    a batch of the run's shape) is fastest here, measured once at the start: on the CPU the
    fused forward wins and PyTorch's own backward may not, so the order alone cannot say.
    Every rank uses rank 0's pick, and the run records it so that a resume trains the same."""
    if args.op_backend != "auto":
        return args.op_backend
    device = procs.device
    candidates = ops.auto_candidates("group_norm_silu", torch.empty(1, 8, 1, 1, device=device))
    seconds = {backend: time_training_pass(args, model, schedule, device, backend) for backend in candidates}
    pick = [min(seconds, key=seconds.get)]
    if procs.world_size > 1:
        dist.broadcast_object_list(pick, src=0)
    if procs.is_main:
        timings = ", ".join(f"{backend} {value:.3g} s" for backend, value in seconds.items())
        print(f"sr3_engine: --op-backend auto picked {pick[0]} (a training pass took {timings})", file=sys.stderr)
    return pick[0]


def time_training_pass(args: argparse.Namespace, model: SR3UNet, schedule: NoiseSchedule, device: torch.device,
                       backend: str, repeats: int = 2) -> float:
    """Best seconds of `repeats` forward+backward passes of the loss through `model` on `backend`,
    after one warm-up; the gradients are dropped and every random state is left as it was."""
    dtype = amp_dtype(args, device)
    generator = torch.Generator(device).manual_seed(0)
    y0 = torch.rand(args.batch_size, 3, args.hr_size, args.hr_size, device=device, generator=generator) * 2 - 1
    set_op_backend(model, backend)
    best = float("inf")
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for repeat in range(repeats + 1):
            start = time.perf_counter()
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                loss = diffusion_loss(model, y0, y0, schedule, loss_norm(args), generator=generator)
            loss.backward()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if repeat:
                best = min(best, time.perf_counter() - start)
    model.zero_grad(set_to_none=True)
    return best


def restore(run: Run, state: dict[str, Any]) -> None:
    run.model.load_state_dict(state["model"])
    run.ema.load_state_dict(state["ema"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    if state["scaler"]:
        run.scaler.load_state_dict(state["scaler"])
    run.step, run.data_position = int(state["step"]), int(state["data_position"])


def training_state(run: Run) -> dict[str, Any]:
    return {
        "step": run.step,
        "data_position": run.data_position,
        "data_fingerprint": run.data_fingerprint,
        "args": {k: v for k, v in vars(run.args).items() if k != "resume"},
        "model_config": run.config.to_dict(),
        "model": run.model.state_dict(),
        "ema": run.ema.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict() if run.scaler.is_enabled() else {},
    }


def autocast(run: Run) -> contextlib.AbstractContextManager:
    if run.amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(run.procs.device.type, dtype=run.amp_dtype)


def train_step(run: Run, x_up: torch.Tensor, y0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One optimiser step; returns (loss, gradient norm before clipping, learning rate used)."""
    args, rank = run.args, run.procs.rank
    torch.manual_seed(derive_seed(args.seed, "dropout", rank, run.step))
    run.noise.manual_seed(derive_seed(args.seed, "noise", rank, run.step))
    lr = run.optimizer.param_groups[0]["lr"]
    with autocast(run):
        loss = run.objective(run.net, x_up, y0, generator=run.noise)
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    run.scaler.unscale_(run.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), args.grad_clip or float("inf"))
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.scheduler.step()
    update_ema(run.ema, run.model, min(args.ema_decay, (1 + run.step) / (10 + run.step)))
    run.step += 1
    return loss.detach(), grad_norm.detach(), lr


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - decay)
    for ema_buffer, buffer in zip(ema.buffers(), model.buffers()):
        ema_buffer.copy_(buffer)


def mean_over_ranks(value: torch.Tensor, procs: Processes) -> float:
    if procs.world_size > 1:
        value = value.clone()
        dist.all_reduce(value)
        value /= procs.world_size
    return float(value)


def model_spec(run: Run) -> model_dir.ModelSpec:
    """What the saved model directory says: the inference schedule and the default sampler."""
    return model_dir.ModelSpec(run.config, run.inference_schedule.config, run.sampler, run.args.scale,
                               run.args.resampler, run.train_schedule.config)


def validate(run: Run, hr: torch.Tensor) -> dict[str, float]:
    """Sample the validation crops with the EMA weights, the saved model's schedule and sampler
    and a fixed seed; mean metrics."""
    scale = run.args.scale
    lr = make_lr(hr, scale)
    generator = torch.Generator().manual_seed(derive_seed(run.args.seed, "validation"))
    x_up = condition(lr.to(run.procs.device), scale, run.config.size_multiple, run.args.resampler)
    with torch.inference_mode():
        y0 = sample(run.ema, x_up, run.inference_schedule, model_spec(run).sampler, generator=generator)
    sr = output_image(y0[..., :hr.shape[-2], :hr.shape[-1]]).to(hr.device)
    return {"psnr": float(metrics.psnr(sr, hr).mean()), "ssim": float(metrics.ssim(sr, hr).mean()),
            "consistency": float(metrics.consistency(sr, lr, run.args.scale).mean())}


def save_checkpoint(run: Run, log: ckpt.JsonlLog | None) -> None:
    """Rank 0 writes model/ (EMA weights) then state.pt; every rank waits for it."""
    run.procs.barrier()
    if run.procs.is_main:
        bad = [name for name, p in run.model.named_parameters() if not bool(torch.isfinite(p).all())]
        if bad:
            raise RuntimeError(f"{run.out}: not saving step {run.step}: parameter {bad[0]} is not finite")
        tag = f"{os.getpid()}-{run.step}"
        model_dir.replace(run.out / ckpt.MODEL_DIR, run.ema.state_dict(), model_spec(run), tag=tag)
        ckpt.save_state(run.out / ckpt.STATE_FILE, training_state(run))
        if log is not None:
            log.write({"type": "checkpoint", "step": run.step, "time": time.time()})
    run.procs.barrier()
    if os.environ.get(KILL_AFTER_SAVE_ENV) == str(next(_saves)):
        os.kill(os.getpid(), signal.SIGKILL)


def replica_checksums(run: Run) -> list[str]:
    """sha256 of every rank's raw weights, so a log shows that the replicas stayed identical."""
    digest = hashlib.sha256()
    for tensor in run.model.state_dict().values():
        digest.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    checksums = [digest.hexdigest()] * run.procs.world_size
    if run.procs.world_size > 1:
        dist.all_gather_object(checksums, digest.hexdigest())
    return checksums


def is_due(step: int, every: int, last: int) -> bool:
    return step == last or (every > 0 and step % every == 0)


def batches(run: Run, paths: list[Path]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    args, procs = run.args, run.procs
    dataset = CropDataset(paths, args.hr_size, args.scale, args.seed, args.blur_sigma, args.resampler)
    sampler = StreamBatchSampler(len(paths), args.batch_size, args.seed, rank=procs.rank,
                                 world_size=procs.world_size, start_position=run.data_position)
    workers = args.num_workers
    if workers is None:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        workers = min(4, max(1, (os.cpu_count() or 1) // local - 1)) if procs.device.type == "cuda" else 0
    for x_up, y0 in make_loader(dataset, sampler, num_workers=workers, pin_memory=procs.device.type == "cuda"):
        run.data_position += sampler.samples_per_step
        yield x_up.to(procs.device, non_blocking=True), y0.to(procs.device, non_blocking=True)


def train_record(run: Run, loss: torch.Tensor, grad_norm: torch.Tensor, lr: float,
                 since: tuple[float, int]) -> dict[str, Any]:
    """The log record of this step (loss averaged over ranks); raises if the loss is not finite."""
    value = mean_over_ranks(loss, run.procs)
    if not math.isfinite(value):
        raise RuntimeError(f"{run.out}: training diverged: loss is {value} at step {run.step}")
    now = time.time()
    rate = (run.step - since[1]) / max(now - since[0], 1e-9)
    return {"type": "train", "step": run.step, "loss": value, "lr": lr, "grad_norm": float(grad_norm),
            "steps_per_s": rate, "time": now}


def train_loop(run: Run, paths: list[Path], val_hr: torch.Tensor | None, log: ckpt.JsonlLog | None) -> None:
    """Steps until --steps; rank 0 (which alone holds `val_hr` and `log`) validates and writes."""
    args = run.args
    data = batches(run, paths)
    bar = tqdm(total=args.steps, initial=run.step, unit="step", desc="training", disable=not run.procs.is_main)
    since = (time.time(), run.step)
    try:
        while run.step < args.steps:
            loss, grad_norm, lr = train_step(run, *next(data))
            if is_due(run.step, args.log_every, args.steps):
                record = train_record(run, loss, grad_norm, lr, since)
                since = (record["time"], run.step)
                bar.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)
                if log is not None:
                    log.write(record)
            if args.val_data and is_due(run.step, args.val_every, args.steps):
                if log is not None:
                    log.write({"type": "validation", "step": run.step, "time": time.time(), **validate(run, val_hr)})
                run.procs.barrier()
            if is_due(run.step, args.save_every, args.steps):
                save_checkpoint(run, log)
            bar.update(1)
    finally:
        bar.close()
        data.close()


def finish(run: Run, log: ckpt.JsonlLog | None) -> None:
    """Write the final record with every rank's weight checksum; fail if the replicas differ."""
    checksums = replica_checksums(run)
    if log is not None:
        log.write({"type": "done", "step": run.step, "time": time.time(), "weights_sha256": checksums})
    if len(set(checksums)) > 1:
        raise RuntimeError(f"{run.out}: the ranks' weights diverged: {checksums}")
