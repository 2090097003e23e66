"""The `cpp` op backend: loads the C++/CUDA extension sr3_engine._C and registers its operators
(torch.ops.sr3_engine_cpp.group_norm_silu and .posterior_step) with `sr3_engine.ops`
(`sr3_engine.op_backends` calls `register_cpp_backend`).

- Runs on CPU tensors, and on CUDA tensors when the module was built with its CUDA kernels
  (`_C.has_cuda()`); x / y_t must be contiguous or channels_last (others go to `native` under
  `auto`, and a named `cpp` raises with that reason).
- group_norm_silu is autograd-capable: the kernel computes the forward pass; the backward pass is
  `register_autograd` of `sr3_engine.ops.group_norm_silu`, shared with the Triton op (float32, statistics
  recomputed from the inputs, PyTorch's GroupNorm and SiLU backward kernels). Higher-order gradients are not supported.
- posterior_step draws seeded noise inside the kernel with the Philox stream of csrc/philox.h
  (the Triton backend's stream), so no noise tensor is materialised. Its seed is an int argument:
  a seed tensor is read on the host first (`ops.dispatch`), so this op cannot serve a CUDA graph
  that is replayed with new seeds.
- `SR3_ENGINE_SKIP_EXT=1` in the environment leaves the extension unloaded; `register_cpp_backend`
  then, like any failed import, returns the reason that the `cpp` backend's errors will quote.
"""

from __future__ import annotations

import importlib
import os

import torch

from .ops import dispatch
from .ops.group_norm_silu import register_autograd

SKIP_ENV = "SR3_ENGINE_SKIP_EXT"
_NAMESPACE = "sr3_engine_cpp"


def load_extension():
    """The module sr3_engine._C, or the reason it cannot be used, as (module, None) or (None, reason)."""
    if os.environ.get(SKIP_ENV, "0") == "1":
        return None, f"{SKIP_ENV}=1 is set, so the C++ extension sr3_engine._C was not loaded"
    try:
        extension = importlib.import_module(f"{__package__}._C")
    except ModuleNotFoundError as error:
        if error.name != f"{__package__}._C":
            return None, f"the C++ extension sr3_engine._C failed to import ({error})"
        return None, ("the C++ extension sr3_engine._C is not built (it needs cmake and a C++ compiler at "
                      f"install time, and is skipped when {SKIP_ENV}=1; reinstall to build it)")
    except ImportError as error:
        return None, f"the C++ extension sr3_engine._C failed to import ({error})"
    built_for = tuple(extension.torch_version.split(".")[:2])
    if built_for != tuple(torch.__version__.split("+")[0].split(".")[:2]):
        return None, (f"the C++ extension sr3_engine._C was built for torch {extension.torch_version} but torch "
                      f"{torch.__version__} is installed; reinstall sr3_engine to rebuild it")
    return extension, None


def _predicate(extension):
    def why_not(x: torch.Tensor) -> str | None:
        if x.device.type == "cuda" and not extension.has_cuda():
            return ("sr3_engine._C was built without its CUDA kernels (they need nvcc and a CUDA-enabled "
                    "torch at install time)")
        if x.device.type not in ("cpu", "cuda"):
            return f"the C++ kernels run on cpu and cuda tensors, not {x.device.type}"
        if not (x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))):
            return f"the input must be contiguous or channels_last; got strides {x.stride()}"
        return None
    return why_not


def _register_torch_extras() -> None:
    group_norm_silu = f"{_NAMESPACE}::group_norm_silu"
    register_autograd(group_norm_silu)

    @torch.library.register_fake(group_norm_silu)
    def _(x, num_groups, weight, bias, pre_bias, eps):
        return torch.empty_like(x)

    @torch.library.register_fake(f"{_NAMESPACE}::posterior_step")
    def _(y_t, pred, noise, seed, step, state_coef, output_coef, coef1, coef2, sigma, clip):
        return torch.empty_like(y_t)


def _group_norm_silu_cpp(x, num_groups, weight, bias, eps, pre_bias):
    return torch.ops.sr3_engine_cpp.group_norm_silu(x, num_groups, weight, bias, pre_bias, float(eps))


def _posterior_step_cpp(y_t, pred, state_coef, output_coef, coef1, coef2, sigma, noise, seed, step,
                        clip):
    return torch.ops.sr3_engine_cpp.posterior_step(
        y_t, pred, noise, seed, dispatch.as_int64_seed(step), state_coef,
        output_coef, coef1, coef2, sigma, bool(clip),
    )


def register_cpp_backend() -> str | None:
    """Register the `cpp` backend of every op; None on success, else why it is unavailable."""
    extension, reason = load_extension()
    if extension is None:
        return reason
    _register_torch_extras()
    predicate = _predicate(extension)
    dispatch.register("group_norm_silu", "cpp", _group_norm_silu_cpp, predicate)
    dispatch.register("posterior_step", "cpp", _posterior_step_cpp, predicate)
    return None
