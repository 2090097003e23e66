"""Training-step benchmarks: one optimiser step of a training run, per GroupNorm+SiLU op backend.

    pytest bench/test_train.py --benchmark-json train.json

A round is one step as `sr3_engine train` takes it: the diffusion loss of the model's
prediction target (L1) on a batch of HR crops and their bicubic conditions, backward through
the network, gradient clipping and an AdamW update, in float32. The model is the bundled demo-x4
(its architecture and weights) on the CPU, where its recipe trains it, and a seeded sr3-16-128
on CUDA (`harness.TRAIN_PROBLEMS`). Rows compare the op backends of the network's
GroupNorm+SiLU, so `--op-backend` (and what `auto` picks) can be chosen by these figures.
"""

from __future__ import annotations

import pytest
import torch

import sr3_engine as sr3
from sr3_engine import ops
from sr3_engine.diffusion import condition, diffusion_loss
from sr3_engine.training.data import make_lr
from sr3_engine.unet import set_op_backend

from .harness import TRAIN_PROBLEMS, load_model, median_seconds, record

SCALE = 4


@pytest.mark.parametrize("op_backend", ops.OP_BACKENDS)
def test_train_step(benchmark, device, device_info, op_backend):
    name, batch, size = TRAIN_PROBLEMS[device.type]
    model = load_model(name)[0].to(device).train()
    probe = torch.empty(1, 8, 1, 1, device=device)
    reason = ops.why_unavailable("group_norm_silu", op_backend, probe)
    if reason is not None:
        pytest.skip(f"{op_backend}: {reason}")
    set_op_backend(model, op_backend)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    schedule = sr3.NoiseSchedule.linear(2000, 1e-6, 1e-2)
    generator = torch.Generator(device).manual_seed(0)
    hr = torch.rand(batch, 3, size, size, device=device, generator=generator)
    x_up = condition(make_lr(hr, SCALE), SCALE, model.config.size_multiple)
    y0 = hr * 2 - 1

    def step() -> torch.Tensor:
        loss = diffusion_loss(model, x_up, y0, schedule, 1, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        return loss.detach()

    benchmark.group = f"train step {name} {size}x{size} batch {batch}"
    loss = benchmark(step)
    seconds = median_seconds(benchmark)
    record(benchmark, device_info, kind="train", op_backend=op_backend, config=name, batch=batch, height=size,
           width=size, images_per_s=batch / seconds if seconds else None)
    assert bool(torch.isfinite(loss))
