"""The C++ GroupNorm+SiLU's two ways of writing bfloat16 (csrc/sr3_kernels.h: Bf16Path): the
CPU's AVX-512 BF16 conversion where cpuid reports it, integer rounding elsewhere, chosen at run
time by one build. The path taken is compared with the kernel's own CPU flags, the generic
path's output with the float32 kernel's rounded by torch, and the AVX-512 BF16 path's with the
generic one's where the CPU has both.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from sr3_engine import ops

_REASON = ops.why_unavailable("group_norm_silu", "cpp", torch.zeros(1))
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"cpp: {_REASON}")
AVX512_BF16 = {"avx512_bf16", "avx512f", "avx512bw", "avx512vl"}


def _cpu_flags() -> set[str]:
    text = Path("/proc/cpuinfo").read_text()
    return set(re.search(r"^flags\s*:(.*)$", text, flags=re.MULTILINE)[1].split())


def _assert_within_a_step(out: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal bits but for at most 1 in 1,000 values one bfloat16 step apart: the float values
    are computed by loops the compiler contracts into fused multiply-adds in its own way, and a
    value a float32 rounding away from a bfloat16 rounding boundary may cross it."""
    steps = (out.view(torch.int16).int() - expected.view(torch.int16).int()).abs()
    assert int(steps.max()) <= 1 and int((steps > 0).sum()) <= out.numel() // 1000


@pytest.fixture
def extension():
    from sr3_engine import _C

    yield _C
    _C.force_bf16_path("auto")


def _group_norm_silu(shape, channels_last: bool) -> torch.Tensor:
    generator = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=generator) * 3 + 0.5).to(torch.bfloat16)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(shape[1], generator=generator), torch.randn(shape[1], generator=generator)
    pre_bias = torch.randn(shape[0], shape[1], generator=generator)
    return torch.ops.sr3_engine_cpp.group_norm_silu(x, 4, weight, bias, pre_bias, 1e-5)


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="reads the flags of Linux's /proc/cpuinfo")
def test_the_path_taken_is_the_one_this_cpu_has(extension):
    expected = "avx512bf16" if AVX512_BF16 <= _cpu_flags() else "generic"
    assert extension.bf16_path() == expected


def test_generic_can_be_forced_and_a_missing_path_cannot(extension):
    extension.force_bf16_path("generic")
    assert extension.bf16_path() == "generic"
    with pytest.raises(ValueError, match="^force_bf16_path: expected 'auto', 'generic' or 'avx512bf16'; got 'amx'$"):
        extension.force_bf16_path("amx")
    if "avx512_bf16" not in _cpu_flags():
        with pytest.raises(ValueError, match="^force_bf16_path: this CPU has no AVX-512 BF16; 'avx512bf16' cannot "
                                             "run here$"):
            extension.force_bf16_path("avx512bf16")
        assert extension.bf16_path() == "generic"
    extension.force_bf16_path("auto")
    assert extension.bf16_path() in ("generic", "avx512bf16")


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape", [(2, 32, 64, 64), (1, 40, 7, 9), (3, 8, 5, 3)], ids=str)
def test_generic_bf16_is_float32_rounded_to_nearest_even(extension, shape, channels_last):
    # The same kernel in float32, rounded by torch.
    extension.force_bf16_path("generic")
    out = _group_norm_silu(shape, channels_last)
    generator = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=generator) * 3 + 0.5).to(torch.bfloat16).float()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(shape[1], generator=generator), torch.randn(shape[1], generator=generator)
    pre_bias = torch.randn(shape[0], shape[1], generator=generator)
    float_out = torch.ops.sr3_engine_cpp.group_norm_silu(x, 4, weight, bias, pre_bias, 1e-5)
    _assert_within_a_step(out, float_out.to(torch.bfloat16))


@pytest.mark.skipif("avx512_bf16" not in (_cpu_flags() if Path("/proc/cpuinfo").exists() else set()),
                    reason="needs a CPU with AVX-512 BF16")
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape", [(2, 32, 64, 64), (1, 40, 7, 9), (3, 8, 5, 3), (1, 64, 128, 128)], ids=str)
def test_both_paths_write_the_same_values(extension, shape, channels_last):
    # Sizes that are not multiples of 16 or 32 take the masked tail of the conversion.
    extension.force_bf16_path("avx512bf16")
    native = _group_norm_silu(shape, channels_last)
    extension.force_bf16_path("generic")
    generic = _group_norm_silu(shape, channels_last)
    _assert_within_a_step(native, generic)


@pytest.mark.skipif(shutil.which("objdump") is None or os.uname().machine != "x86_64",
                    reason="needs objdump on x86-64")
def test_every_build_holds_the_avx512_bf16_conversion():
    from sr3_engine import _C

    listing = subprocess.run(["objdump", "-d", _C.__file__], capture_output=True, text=True, timeout=120).stdout
    assert "vcvtne2ps2bf16" in listing and "vcvtneps2bf16" in listing
