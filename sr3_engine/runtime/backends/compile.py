"""The compile backend: the eager sampling loop around `torch.compile(model)`.

It is the baseline the fused backend has to beat on a GPU (`mode="max-autotune"` there),
so by default it compiles the plain PyTorch model: op backend `auto` means `native` here,
and Inductor fuses GroupNorm+SiLU itself (a custom op would be an opaque call to it). A
named op backend (`triton`, `cpp`) is used as asked. The denoiser is compiled once per
process and recompiled by Dynamo when shapes change: `dynamic=None` (the default) lets it
mark them dynamic after the first change, `dynamic=False` compiles every shape for itself
(what benchmarks use, so that each batch gets kernels tuned for it). `compiler` picks the
torch.compile backend: "inductor" (the default) generates kernels; "aot_eager" only traces,
which tests use to check the plumbing without a code generator.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .eager import EagerBackend


class CompileBackend(EagerBackend):
    name = "compile"

    def __init__(self, model: nn.Module, device: torch.device, dtype: torch.dtype, op_backend: str = "auto", *,
                 mode: str | None = None, compiler: str = "inductor", fullgraph: bool = False,
                 dynamic: bool | None = None):
        super().__init__(model, device, dtype, "native" if op_backend == "auto" else op_backend)
        self.model = torch.compile(self.model, mode=mode, backend=compiler, fullgraph=fullgraph, dynamic=dynamic)
