"""Where the Triton kernels run and how wide their launches are: the `triton` backend's dispatch
predicate (`why_not_runnable`) and the program count that fills a device (`programs_to_fill`).

Triton reads TRITON_INTERPRET when a kernel is defined, so `INTERPRETED` is fixed at import.
"""

import functools
import os

import torch

# Read once at import, as Triton itself reads it when it defines the kernels.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
_MIN_CAPABILITY = (7, 0)


_capabilities: dict[int, tuple[int, int]] = {}


def _capability(index: int) -> tuple[int, int]:
    # A plain dict, not functools.cache: torch.compile traces this predicate (through ops)
    # and reads a dict without a graph break once the first eager call has filled it.
    if index not in _capabilities:
        _capabilities[index] = torch.cuda.get_device_capability(index)
    return _capabilities[index]


def why_not_runnable(x: torch.Tensor) -> str | None:
    """The dispatch predicate of the `triton` backend: None when the kernels can run on x."""
    if x.device.type == "cuda":
        capability = _capability(x.device.index)
        if capability < _MIN_CAPABILITY:
            need, have = ".".join(map(str, _MIN_CAPABILITY)), ".".join(map(str, capability))
            return f"Triton needs compute capability >= {need}; {x.device} has {have}"
        return None
    if x.device.type == "cpu" and INTERPRETED:
        return None
    if x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1":
        return "TRITON_INTERPRET=1 was set after sr3_engine was imported; set it before the import"
    return "Triton kernels need a CUDA tensor; set TRITON_INTERPRET=1 to run them on the CPU interpreter"


@functools.cache
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def programs_to_fill(device: torch.device) -> int:
    """How many programs a launch needs to keep `device` (a tensor's, so indexed) busy: two per
    SM on CUDA; one on the interpreter, which runs programs one after another and is fastest
    with few, large ones."""
    if device.type != "cuda":
        return 1
    return 2 * _multiprocessors(device.index)
