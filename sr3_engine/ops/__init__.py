"""Fused ops behind one dispatch point each: `group_norm_silu` and `posterior_step`.

Each op's file holds its float64 reference (`*_ref`), the argument rules every backend
shares, the native (PyTorch) backend and the public entry point; `dispatch` holds the
registry. The `triton` and `cpp` backends register themselves from `sr3_engine.kernels`
and `sr3_engine._ext`, which `sr3_engine.op_backends` loads; nothing here imports them.
"""

from .dispatch import (OP_BACKENDS, as_int64_seed, auto_candidates, available_backends, dense_format, mark_unavailable, register,
                       resolve_backend, why_no_device_seed, why_unavailable)
from .group_norm_silu import group_norm_silu, group_norm_silu_backward, group_norm_silu_ref
from .posterior_step import posterior_step, posterior_step_ref

__all__ = [
    "OP_BACKENDS",
    "as_int64_seed",
    "auto_candidates",
    "available_backends",
    "dense_format",
    "group_norm_silu",
    "group_norm_silu_backward",
    "group_norm_silu_ref",
    "mark_unavailable",
    "posterior_step",
    "posterior_step_ref",
    "register",
    "resolve_backend",
    "why_no_device_seed",
    "why_unavailable",
]
