"""The reference backend: the PyTorch module as it is, one Python-level step at a time."""

from __future__ import annotations

import torch
import torch.nn as nn

from ...samplers import SamplingPlan, StepCallback, run_plan
from ...unet import set_op_backend


class EagerBackend:
    name = "eager"

    def __init__(self, model: nn.Module, device: torch.device, dtype: torch.dtype, op_backend: str = "auto"):
        self.device = device
        self.dtype = dtype
        self.op_backend = op_backend
        self.model = model.to(device=device, dtype=dtype).eval()
        set_op_backend(self.model, op_backend)

    @torch.inference_mode()
    def run(self, x_up: torch.Tensor, y_T: torch.Tensor, plan: SamplingPlan, *,
            generator: torch.Generator | None, callback: StepCallback | None) -> torch.Tensor:
        return run_plan(self.model, x_up.to(self.dtype), y_T, plan, generator=generator,
                        callback=callback, backend=self.op_backend)
