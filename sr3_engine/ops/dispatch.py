"""The op registry: one dispatch point per fused op, and the argument rules every backend shares.

Backends: `native` (plain PyTorch, always registered by this package), `triton` and `cpp`
(fused kernels, registered by `sr3_engine.kernels` and `sr3_engine._ext` when they import;
this module never imports them). A backend named by the caller is used or the call raises
with the reason it cannot run; `auto` takes the fastest one whose predicates hold (device,
dtype, import succeeded) and never fails while `native` can run.

Seeds (`posterior_step`): an int, or a 0-d int64 tensor on the tensors' device. A backend
registered with `device_seed=True` reads a tensor seed inside its kernel, so a captured CUDA
graph replays with whatever seed the tensor holds; the others are handed `int(seed)`, a host
read that CUDA graph capture forbids (`why_no_device_seed` says which can be captured).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable

import torch

logger = logging.getLogger("sr3_engine.ops")

OP_BACKENDS = ("native", "triton", "cpp")
OPS = ("group_norm_silu", "posterior_step")
HALF_DTYPES = (torch.float16, torch.bfloat16)
FLOAT_DTYPES = (torch.float32, *HALF_DTYPES)
# The native backend also runs float64, so whole models can be compared with a float64 reference.
NATIVE_DTYPES = (*FLOAT_DTYPES, torch.float64)
_AUTO_ORDER = {"cuda": ("triton", "cpp", "native"), "cpu": ("cpp", "native")}

Predicate = Callable[[torch.Tensor], "str | None"]


@dataclasses.dataclass(frozen=True)
class Implementation:
    """One backend's version of one op. `why_not(x)` is None when it can run on tensors like x,
    else the reason; `device_seed` says it reads a seed tensor on the device (posterior_step)."""

    run: Callable
    why_not: Predicate | None = None
    device_seed: bool = False


_REGISTRY: dict[str, dict[str, Implementation]] = {op: {} for op in OPS}
_UNAVAILABLE_REASONS: dict[str, str] = {
    "triton": "the Triton kernels are not part of this build",
    "cpp": "the C++ extension sr3_engine._C is not part of this build",
}
_logged_auto_choices: set[tuple[str, str, str]] = set()


def register(op: str, backend: str, run: Callable, why_not: Predicate | None = None, *,
             device_seed: bool = False) -> None:
    """Make `run` the `backend` version of `op`."""
    if op not in _REGISTRY or backend not in OP_BACKENDS:
        raise ValueError(f"register: unknown op {op!r} or backend {backend!r}")
    _REGISTRY[op][backend] = Implementation(run, why_not, device_seed)


def mark_unavailable(backend: str, reason: str) -> None:
    """Record why a fused backend could not be loaded, for the error a caller will see."""
    _UNAVAILABLE_REASONS[backend] = reason


def why_unavailable(op: str, backend: str, x: torch.Tensor) -> str | None:
    """None when `backend` can run `op` on tensors like `x`; otherwise the reason."""
    if backend not in OP_BACKENDS:
        return f"unknown backend {backend!r}; choose one of {('auto',) + OP_BACKENDS}"
    implementation = _REGISTRY[op].get(backend)
    if implementation is None:
        return _UNAVAILABLE_REASONS.get(backend, f"{op} has no {backend} implementation")
    allowed = NATIVE_DTYPES if backend == "native" else FLOAT_DTYPES
    if x.dtype not in allowed:
        return f"dtype {x.dtype} is not supported ({', '.join(str(d).removeprefix('torch.') for d in allowed)})"
    return implementation.why_not(x) if implementation.why_not is not None else None


def why_no_device_seed(backend: str, device: torch.device) -> str | None:
    """None when `backend`'s posterior_step reads its seed on `device` (so a CUDA graph of it
    can be replayed with a new seed); otherwise the reason."""
    implementation = _REGISTRY["posterior_step"].get(backend)
    if implementation is None:
        return _UNAVAILABLE_REASONS.get(backend, f"posterior_step has no {backend} implementation")
    if device.type == "cuda" and not implementation.device_seed:
        return (f"its posterior_step reads the seed on the host (int(seed)), which a CUDA graph cannot "
                f"capture; only a backend that reads a device seed can ({device_seed_backends()})")
    return None


def device_seed_backends() -> list[str]:
    return [name for name, impl in _REGISTRY["posterior_step"].items() if impl.device_seed]


def resolve_backend(op: str, backend: str, x: torch.Tensor) -> str:
    if backend != "auto":
        reason = why_unavailable(op, backend, x)
        if reason is not None:
            raise RuntimeError(f"{op}: backend {backend!r} cannot run on {x.device.type} {x.dtype}: {reason}")
        return backend
    candidates = auto_candidates(op, x)
    if not candidates:
        raise RuntimeError(f"{op}: no backend can run on {x.device.type} {x.dtype}")
    key = (op, x.device.type, candidates[0])
    # Logging inside a torch.compile trace is a graph break; the eager call logs it.
    if key not in _logged_auto_choices and not torch.compiler.is_compiling():
        _logged_auto_choices.add(key)
        logger.info("%s on %s: auto picked the %s backend", op, x.device.type, candidates[0])
    return candidates[0]


def implementation(op: str, backend: str, x: torch.Tensor) -> Implementation:
    """The implementation `backend` (or `auto`) resolves to for tensors like `x`."""
    return _REGISTRY[op][resolve_backend(op, backend, x)]


def auto_candidates(op: str, x: torch.Tensor) -> list[str]:
    """The backends `auto` chooses among for tensors like `x`, in its order of preference."""
    return [b for b in _AUTO_ORDER.get(x.device.type, ("native",)) if why_unavailable(op, b, x) is None]


def available_backends(op: str, x: torch.Tensor) -> list[str]:
    return [b for b in OP_BACKENDS if why_unavailable(op, b, x) is None]


def dense_format(t: torch.Tensor) -> torch.memory_format:
    """The layout fused kernels run in, and their output's: channels_last when `t` is laid out
    so, else NCHW (a tensor in neither layout is copied to NCHW)."""
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def as_int64_seed(seed: int) -> int:
    """An int seed as the signed 64-bit value a 0-d int64 seed tensor would hold (modulo 2**64)."""
    return (int(seed) + 2**63) % 2**64 - 2**63
