"""`python -m sr3_engine.kernels.compile_check` (what `make check-triton` runs): every Triton kernel
compiled for sm_90 and sm_80 without a GPU, over shapes that reach every specialisation.

The Triton interpreter, which runs the kernels on the CPU in the tests, does not specialise
arguments the way compiled Triton does: an int argument equal to 1 becomes a compile-time
constant, multiples of 16 are marked aligned. So a kernel can pass every interpreted test and
still fail to compile for a GPU. This compiles each launch exactly as the JIT would (the
launcher's own plan, its arguments' specialisation) with Triton's compiler and the ptxas it
ships, for a GPUTarget with no GPU present, and reads registers and local memory (spills)
from the cubin with the cuobjdump it ships. A compile error or any local memory fails the check.

Grid: GroupNorm+SiLU at a 1x1 bottleneck (batch 1 and 16), odd channels per group (96/24 at
7x9, 192/32 at 16x16), sr3-16-128's 64x128x128 at batch 1 and 16 and a 128x1024x1024 map, both
memory formats, float32/float16/bfloat16; the posterior step with drawn noise (a small and a
64-bit seed in a register, a seed in memory) and with given noise, in each dtype, on 1 and on
32x3x512x512 elements.
"""

from __future__ import annotations

import argparse
import itertools
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Sequence

import torch
import triton

from . import group_norm_silu as gn
from . import posterior_step as ps

CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
ARCHS = (90, 80)
SMS = {90: 132, 80: 108}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# (batch, channels, groups, H*W)
GROUP_NORM_SHAPES = ((1, 512, 32, 1), (16, 512, 32, 1), (1, 96, 24, 7 * 9), (2, 192, 32, 16 * 16),
                     (1, 64, 32, 128 * 128), (16, 64, 32, 128 * 128), (1, 128, 32, 1024 * 1024))
POSTERIOR_NUMELS = (1, 32 * 3 * 512 * 512)
_POINTERS = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.int64: "*i64"}
Launch = tuple  # (kernel, arguments, constexprs, num_warps, description)


def compile_launch(fn, args: dict, constexprs: dict, num_warps: int, arch: int):
    """`fn` compiled as the JIT would compile a launch with `args` (dtypes stand for tensors,
    None for absent optional tensors) for an sm_`arch` GPU. Needs no GPU."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, attrs = {}, {}
    constexprs = dict(constexprs)
    unspecialised = set(getattr(fn, "do_not_specialize", ()) or ())
    unspecialised |= {fn.arg_names[i] for i in unspecialised if isinstance(i, int)}
    for index, name in enumerate(fn.arg_names):
        value = args.get(name, constexprs.get(name))
        if name in constexprs or value is None:
            signature[name] = "constexpr"
            constexprs[name] = value
        elif isinstance(value, torch.dtype):  # a 16-byte aligned tensor
            signature[name], attrs[(index,)] = _POINTERS[value], [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif name in unspecialised:
            signature[name] = "i64" if abs(value) >= 2**31 else "i32"
        elif value == 1:  # the JIT passes an int equal to 1 as a constant
            signature[name], constexprs[name] = "constexpr", 1
        else:
            signature[name] = "i64" if abs(value) >= 2**31 else "i32"
            if value % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
    return triton.compile(ASTSource(fn, signature, constexprs, attrs=attrs),
                          target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})


def group_norm_silu_launches(batch: int, channels: int, groups: int, hw: int, channels_last: bool,
                             dtype: torch.dtype, sms: int) -> list[Launch]:
    """Both launches of one group_norm_silu call, planned as the launcher plans them."""
    inner = channels_last or hw == 1
    p = gn.plan(batch, channels, groups, hw, inner, dtype.itemsize, 2 * sms)
    cpg = channels // groups
    shared = dict(num_channels=channels, hw=hw, stride_b=channels * hw, stride_outer=channels if inner else hw,
                  chunk=p.chunk, num_chunks=p.num_chunks)
    constexprs = dict(CPG=cpg, CPG_P2=triton.next_power_of_2(cpg), GB=p.groups_per_block, BLOCK_S=p.block_s,
                      TILES=triton.cdiv(p.chunk, p.block_s), CHANNELS_INNER=p.channels_inner)
    stats = dict(x_ptr=dtype, mean_ptr=torch.float32, m2_ptr=torch.float32, **shared)
    # The parameters come in the module's dtype, which is x's in every engine.
    apply = dict(x_ptr=dtype, y_ptr=dtype, mean_ptr=torch.float32, m2_ptr=torch.float32, weight_ptr=dtype,
                 bias_ptr=dtype, pre_bias_ptr=dtype, eps=1e-5, **shared)
    apply_constexprs = dict(constexprs, CHUNKS_P2=triton.next_power_of_2(p.num_chunks), HAS_WEIGHT=True,
                            HAS_BIAS=True, HAS_PRE_BIAS=True)
    layout = "nhwc" if channels_last else "nchw"
    what = f"{batch}x{channels}/{groups}x{hw} {layout} {str(dtype).removeprefix('torch.')}"
    return [(gn._stats_kernel, stats, constexprs, p.num_warps, what),
            (gn._apply_kernel, apply, apply_constexprs, p.num_warps, what)]


def posterior_step_launch(numel: int, dtype: torch.dtype, noise: str, sms: int) -> Launch:
    """The posterior step on `numel` elements of `dtype`; noise "given", "seed" (a small int, passed
    as i32), "large seed" (what generators give, passed as i64) or "seed tensor"."""
    mode = ps._GIVEN_NOISE if noise == "given" else ps._DRAWN_NOISE
    block = ps._block(numel, 2 * sms)
    args = dict(y_ptr=dtype, pred_ptr=dtype, noise_ptr=dtype if noise == "given" else None, out_ptr=dtype,
                seed_ptr=torch.int64 if noise == "seed tensor" else None, seed=2**40 if noise == "large seed" else 1,
                step=1, numel=numel,
                state_coef=1.0, output_coef=1.0, coef1=0.5, coef2=0.5, sigma=0.1)
    constexprs = dict(CLIP=True, NOISE=mode.value, SEED_IN_MEMORY=noise == "seed tensor", FAST_MATH=True,
                      BLOCK=block)
    return (ps._posterior_step_kernel, args, constexprs, min(8, block // 256),
            f"{numel} {str(dtype).removeprefix('torch.')} {noise}")


def launches(arch: int) -> list[Launch]:
    found = []
    for (batch, channels, groups, hw), channels_last, dtype in itertools.product(
            GROUP_NORM_SHAPES, (False, True), DTYPES):
        found += group_norm_silu_launches(batch, channels, groups, hw, channels_last, dtype, SMS[arch])
    for numel, dtype, noise in itertools.product(POSTERIOR_NUMELS, DTYPES,
                                                 ("given", "seed", "large seed", "seed tensor")):
        found.append(posterior_step_launch(numel, dtype, noise, SMS[arch]))
    return found


def resource_usage(compiled, folder: Path) -> tuple[int, int]:
    """(registers per thread, bytes of local memory per thread) of a compiled kernel."""
    cubin = folder / "kernel.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    usage = subprocess.run([str(CUOBJDUMP), "-res-usage", str(cubin)], capture_output=True, text=True,
                           check=True).stdout
    return int(re.search(r"REG:(\d+)", usage)[1]), int(re.search(r"LOCAL:(\d+)", usage)[1])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sr3_engine.kernels.compile_check",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), help="SM versions (default 90 80)")
    parser.add_argument("--match", default="", help="only launches whose kernel and shape contain this text")
    args = parser.parse_args(argv)
    if not CUOBJDUMP.exists():
        print(f"compile_check: {CUOBJDUMP} is missing: this Triton build has no NVIDIA backend", file=sys.stderr)
        return 2
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.arch:
            for fn, kernel_args, constexprs, num_warps, what in launches(arch):
                name = f"sm_{arch} {fn.__name__} {what}"
                if args.match not in name:
                    continue
                try:
                    registers, local = resource_usage(
                        compile_launch(fn, kernel_args, constexprs, num_warps, arch), Path(tmp))
                except Exception as error:  # a compile error of any kind fails the check with its message
                    failures += 1
                    print(f"FAIL {name}: does not compile: {' '.join(str(error).split())[:300]}")
                    continue
                failed = local > 0
                failures += failed
                print(f"{'FAIL' if failed else 'ok  '} {name}: {registers} registers, {local} bytes local"
                      f"{' (spills)' if failed else ''}", flush=True)
    print(f"compile_check: {failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
