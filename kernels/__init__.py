"""Triton kernels for sr3_engine's fused ops, installed as the subpackage `sr3_engine.kernels`.

Importing this package registers the `triton` backend of `ops.group_norm_silu` and
`ops.posterior_step` (the only backend whose posterior step reads a device seed, which the
fused engine's CUDA graphs need). `sr3_engine.op_backends` imports it; without Triton the
import raises ImportError, which it records as the reason the backend is unavailable.

Where the kernels run: on CUDA tensors, or on CPU tensors when the process was started with
TRITON_INTERPRET=1 (Triton then builds every kernel for its interpreter, which is how the
tests run them on machines without a GPU). Triton reads that variable when a kernel is
defined, so it must be set before `sr3_engine` is imported.
"""

import triton  # noqa: F401  (fails here, with the reason op_backends records, when Triton is missing)

from . import group_norm_silu, posterior_step  # noqa: F401  (registers the backend)
from .device import INTERPRETED, programs_to_fill, why_not_runnable  # noqa: F401
