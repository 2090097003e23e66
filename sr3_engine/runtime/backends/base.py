from __future__ import annotations

from typing import Protocol

import torch

from ...samplers import SamplingPlan, StepCallback


class BackendUnavailableError(RuntimeError):
    """A backend the caller named cannot run here; the message says why."""


class Backend(Protocol):
    name: str
    device: torch.device
    dtype: torch.dtype

    def run(self, x_up: torch.Tensor, y_T: torch.Tensor, plan: SamplingPlan, *,
            generator: torch.Generator | None, callback: StepCallback | None) -> torch.Tensor: ...
