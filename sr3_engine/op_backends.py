"""Loads the fused op backends into the `sr3_engine.ops` registry: the Triton kernels
(`sr3_engine.kernels`, built from kernels/) and the C++/CUDA extension (`sr3_engine._ext`).

Each registers itself when imported; one that cannot load leaves the reason with
`ops.mark_unavailable`, which is what a caller who names that backend is told. The package
imports this module once, so `import sr3_engine` is all a user needs; `ops` itself never
imports a backend, which keeps the dependency one-way.
"""

from __future__ import annotations

from . import _ext, ops


def _load_triton_kernels() -> None:
    try:
        from . import kernels  # noqa: F401  (registers the triton backend)
    except ImportError as error:
        ops.mark_unavailable("triton", f"the Triton kernels could not be imported ({error})")


def _load_cpp_extension() -> None:
    reason = _ext.register_cpp_backend()
    if reason is not None:
        ops.mark_unavailable("cpp", reason)


_load_triton_kernels()
_load_cpp_extension()
