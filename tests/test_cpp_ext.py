"""The C++/CUDA extension sr3_engine._C beyond the three-way op tests of test_ops.py: that CI
really built it, its argument checks, layouts, thread-count independence, the split-reduction
paths, gradients, its Philox noise, the fallback when it is missing, and that every CUDA source
compiles. With SR3_ENGINE_REQUIRE_EXT=1 (as `make test` sets) a missing extension fails here.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sr3_engine import ops

ROOT = Path(__file__).resolve().parents[1]
_REASON = ops.why_unavailable("group_norm_silu", "cpp", torch.zeros(1))
needs_ext = pytest.mark.skipif(_REASON is not None, reason=f"cpp: {_REASON}")
gn_op = torch.ops.sr3_engine_cpp.group_norm_silu if _REASON is None else None
ps_op = torch.ops.sr3_engine_cpp.posterior_step if _REASON is None else None
STEP = dict(state_coef=1.7, output_coef=1.37, coef1=0.21, coef2=0.83, sigma=0.12)


# Each loop applies one of dtype.h's element functions, as the kernels' inner loops do.
_VECTORISED_LOOPS = r"""
#include "cpu/dtype.h"
using namespace sr3::cpu;
template <class Tr> void apply(const typename Tr::Storage* __restrict in, typename Tr::Storage* __restrict out, long n) {
  for (long i = 0; i < n; ++i) out[i] = Tr::store(silu(Tr::load(in[i]) * 1.5f - 0.25f));  // LOOP silu
}
void exp_loop(const float* __restrict in, float* __restrict out, long n) {
  for (long i = 0; i < n; ++i) out[i] = exp_nonpositive(in[i]);  // LOOP exp
}
template void apply<Float32>(const float*, float*, long);
template void apply<Float16>(const uint16_t*, uint16_t*, long);
template void apply<BFloat16>(const uint16_t*, uint16_t*, long);
"""


@pytest.mark.skipif(shutil.which("g++") is None or os.uname().machine != "x86_64", reason="needs g++ on x86-64")
def test_the_cpu_element_functions_vectorise_under_gccs_default_flags(tmp_path):
    # A float select or comparison that GCC under its default -ftrapping-math will not if-convert
    # once made every GroupNorm+SiLU loop scalar, 7x slower, with every output still right.
    source = tmp_path / "loops.cpp"
    source.write_text(_VECTORISED_LOOPS)
    result = subprocess.run(["g++", "-std=c++17", "-O3", "-march=x86-64-v3", f"-I{ROOT / 'csrc'}", "-c", str(source),
                             "-o", str(tmp_path / "loops.o"), "-fopt-info-vec-optimized"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = _VECTORISED_LOOPS.splitlines()
    vectorised = {}
    for message in result.stderr.splitlines():
        parts = message.split(":")
        if len(parts) > 3 and parts[0].endswith("loops.cpp") and "loop vectorized using 32 byte" in message:
            line = lines[int(parts[1]) - 1]
            tag = line[line.index("// LOOP ") + 8:] if "// LOOP " in line else None
            vectorised[tag] = vectorised.get(tag, 0) + 1
    assert vectorised == {"silu": 3, "exp": 1}, result.stderr


def test_extension_is_built_where_required():
    if os.environ.get("SR3_ENGINE_REQUIRE_EXT") != "1":
        pytest.skip("SR3_ENGINE_REQUIRE_EXT=1 is not set")
    assert _REASON is None, _REASON
    assert ops.resolve_backend("group_norm_silu", "auto", torch.zeros(1, 4, 2, 2)) == "cpp"


def _data(shape, dtype=torch.float32, channels_last=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 3 + 1.5).to(dtype)
    x = x.to(memory_format=torch.channels_last) if channels_last else x
    c = shape[1]
    return (x, torch.randn(c, generator=g) * 0.5 + 1, torch.randn(c, generator=g) * 0.5,
            torch.randn(shape[0], c, generator=g))


def _ref(x, groups, weight, bias, pre_bias):
    return ops.group_norm_silu_ref(x.double(), groups, None if weight is None else weight.double(),
                                   None if bias is None else bias.double(),
                                   pre_bias=None if pre_bias is None else pre_bias.double())


# ------------------------------------------------------------------------------ validation

_X = torch.randn(2, 8, 3, 3)
_GN_ERRORS = [
    (lambda: gn_op(_X.double(), 4, None, None, None, 1e-5), "x has dtype Double"),
    (lambda: gn_op(_X[0], 4, None, None, None, 1e-5), "x must be 4-D"),
    (lambda: gn_op(_X[:, :, ::2], 4, None, None, None, 1e-5), "contiguous \\(NCHW\\) or channels_last"),
    (lambda: gn_op(_X.transpose(2, 3), 4, None, None, None, 1e-5), "contiguous \\(NCHW\\) or channels_last"),
    (lambda: gn_op(_X, 3, None, None, None, 1e-5), "8 channels are not divisible by num_groups=3"),
    (lambda: gn_op(_X, 0, None, None, None, 1e-5), "not divisible by num_groups=0"),
    (lambda: gn_op(_X, 4, torch.ones(7), None, None, 1e-5), "weight must have shape \\[8\\]"),
    (lambda: gn_op(_X, 4, None, torch.ones(8, dtype=torch.int32), None, 1e-5), "bias has dtype Int"),
    (lambda: gn_op(_X, 4, None, None, torch.ones(8), 1e-5), "pre_bias must have shape \\[2, 8\\]"),
    (lambda: gn_op(_X, 4, None, None, None, -1.0), "eps must be finite and >= 0"),
    (lambda: gn_op(_X, 4, None, None, None, float("nan")), "eps must be finite"),
]
_PS_ERRORS = [
    (lambda: ps_op(_X, _X[:1], None, None, 0, 1.0, 1.0, 1.0, 1.0, 0.0, True), "pred has shape"),
    (lambda: ps_op(_X.int(), _X, None, None, 0, 1.0, 1.0, 1.0, 1.0, 0.0, True), "y_t has dtype Int"),
    (lambda: ps_op(_X, _X, _X, 3, 0, 1.0, 1.0, 1.0, 1.0, 1.0, True), "either noise or seed"),
    (lambda: ps_op(_X, _X, None, None, 0, 1.0, 1.0, 1.0, 1.0, 1.0, True), "sigma != 0 needs noise or a seed"),
    (lambda: ps_op(_X, _X, _X[:, :4], None, 0, 1.0, 1.0, 1.0, 1.0, 1.0, True), "noise has shape"),
    (lambda: ps_op(_X[:, :, ::2], _X[:, :, ::2], None, None, 0, 1.0, 1.0, 1.0, 1.0, 0.0, True),
     "y_t must be contiguous"),
]


@needs_ext
@pytest.mark.parametrize("call, message", _GN_ERRORS + _PS_ERRORS, ids=[m for _, m in _GN_ERRORS + _PS_ERRORS])
def test_bad_arguments_raise_one_line_value_errors(call, message):
    with pytest.raises(ValueError, match=message) as info:
        call()
    assert "\n" not in str(info.value) and "sr3_engine_cpp::" in str(info.value)


@needs_ext
def test_layouts_the_kernels_cannot_read_go_to_native_under_auto():
    x = torch.randn(2, 8, 6, 6)[:, :, ::2]
    assert "contiguous or channels_last" in ops.why_unavailable("group_norm_silu", "cpp", x)
    assert ops.resolve_backend("group_norm_silu", "auto", x) == "native"
    with pytest.raises(RuntimeError, match="backend 'cpp' cannot run.*contiguous or channels_last"):
        ops.group_norm_silu(x, 4, backend="cpp")


# ------------------------------------------------------------------------------ layouts, threads, split


@needs_ext
@pytest.mark.parametrize("shape", [(2, 16, 5, 7), (1, 8, 1, 1)], ids=str)
def test_channels_last_stays_channels_last(shape):
    x, weight, bias, pre_bias = _data(shape, channels_last=True)
    out = ops.group_norm_silu(x, 4, weight, bias, pre_bias=pre_bias, backend="cpp")
    assert out.stride() == x.stride()
    torch.testing.assert_close(out.double(), _ref(x, 4, weight, bias, pre_bias), rtol=0, atol=2e-6)
    step = ops.posterior_step(x, torch.randn(shape).to(memory_format=torch.channels_last), noise=torch.randn(shape),
                              backend="cpp", **STEP)
    assert step.stride() == x.stride()


@needs_ext
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape, groups", [((4, 32, 70, 70), 1), ((3, 20, 9, 11), 5), ((1, 24, 130, 129), 2),
                                          ((8, 16, 32, 32), 8)], ids=str)
def test_any_thread_count_gives_the_same_bits(shape, groups, channels_last):
    # (4, 32, 70, 70) with 1 group: 4 tasks, so 1 thread goes group by group and 4 threads split
    # every group into chunks; both must sum the same partials in the same order. (8, 16, 32, 32)
    # channels_last: one chunk an image, so 1 thread goes image by image and 4 sweep the batch.
    x, weight, bias, pre_bias = _data(shape, channels_last=channels_last)
    y_t, eps, noise = torch.randn(shape), torch.randn(shape), torch.randn(shape)
    before = torch.get_num_threads()
    outputs = []
    try:
        for threads in (1, 4):
            torch.set_num_threads(threads)
            outputs.append((gn_op(x, groups, weight, bias, pre_bias, 1e-5),
                            ops.posterior_step(y_t, eps, noise=noise, backend="cpp", **STEP),
                            ops.posterior_step(y_t, eps, seed=5, step=2, backend="cpp", **STEP)))
    finally:
        torch.set_num_threads(before)
    for single, multi in zip(*outputs):
        assert torch.equal(single, multi)
    torch.testing.assert_close(outputs[0][0].double(), _ref(x, groups, weight, bias, pre_bias), rtol=1e-5, atol=1e-5)


@needs_ext
@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.bfloat16, 5e-2), (torch.float16, 1e-2)],
                         ids=str)
def test_channels_last_batches_gather_the_next_image_while_writing_this_one(dtype, atol):
    # 40 channels (two tiles of 16 and 8 left over), 3072 rows an image in chunks of 409 rows,
    # so eight chunks an image, blocks of rows that do not divide a chunk, and three images:
    # the output sweep of images 0 and 1 also sums the partials of images 1 and 2.
    x, weight, bias, pre_bias = _data((3, 40, 48, 64), dtype, channels_last=True)
    before = torch.get_num_threads()
    outputs = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outputs.append(gn_op(x, 5, weight, bias, pre_bias, 1e-5))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(outputs[0], out) for out in outputs[1:])
    torch.testing.assert_close(outputs[0].double(), _ref(x, 5, weight, bias, pre_bias), rtol=0, atol=atol)
    # Each image on its own gives the same bits as within the batch.
    alone = torch.cat([gn_op(x[i:i + 1], 5, weight, bias, pre_bias[i:i + 1], 1e-5) for i in range(3)])
    assert torch.equal(alone, outputs[0])


@needs_ext
@pytest.mark.parametrize("dtype, atol", [(torch.float32, 3e-6), (torch.bfloat16, 5e-2)], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_few_groups_with_many_values_split_the_reduction_correctly(dtype, atol, channels_last):
    # One image, two groups of 64 * 96 * 12 values: many chunks per group and per image.
    x, weight, bias, pre_bias = _data((1, 24, 64, 96), dtype, channels_last)
    out = gn_op(x, 2, weight, bias, pre_bias, 1e-5)
    torch.testing.assert_close(out.double(), _ref(x, 2, weight, bias, pre_bias), rtol=0, atol=atol)


@needs_ext
def test_statistics_survive_a_large_offset():
    # Mean 1e4, std 1: a one-pass E[x^2] - E[x]^2 in float32 would lose the variance entirely.
    x = torch.randn(2, 8, 16, 16, generator=torch.Generator().manual_seed(2)) + 1e4
    out = ops.group_norm_silu(x, 2, backend="cpp")
    torch.testing.assert_close(out.double(), _ref(x, 2, None, None, None), rtol=0, atol=1e-5)


@needs_ext
def test_nan_propagates():
    x = torch.randn(1, 4, 3, 3)
    x[0, 1, 1, 1] = float("nan")
    assert torch.isnan(ops.group_norm_silu(x, 2, backend="cpp")[0, :2]).all()
    y = torch.tensor([float("nan"), 0.5, 2.0])
    assert torch.isnan(ops.posterior_step(y, y, noise=y.clone(), backend="cpp", **STEP)[0])


# ------------------------------------------------------------------------------ gradients


@needs_ext
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("affine, with_pre_bias", [(True, True), (False, False), (True, False)],
                         ids=["affine+pre_bias", "plain", "affine"])
def test_gradients_match_the_float64_reference(channels_last, affine, with_pre_bias):
    x, weight, bias, pre_bias = _data((3, 12, 6, 5), channels_last=channels_last, seed=4)
    params = [weight, bias] if affine else [None, None]
    inputs = [x, *params, pre_bias if with_pre_bias else None]
    leaves = [None if t is None else t.clone().requires_grad_() for t in inputs]
    leaves64 = [None if t is None else t.double().requires_grad_() for t in inputs]
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(8))
    out = ops.group_norm_silu(leaves[0], 3, leaves[1], leaves[2], pre_bias=leaves[3], backend="cpp")
    (out * upstream).sum().backward()
    ref = ops.group_norm_silu_ref(leaves64[0], 3, leaves64[1], leaves64[2], pre_bias=leaves64[3])
    (ref * upstream.double()).sum().backward()
    for got, want in zip(leaves, leaves64):
        if got is not None:
            torch.testing.assert_close(got.grad.double(), want.grad, rtol=1e-4, atol=1e-5)


@needs_ext
def test_only_inputs_that_need_gradients_get_them():
    x, weight, bias, pre_bias = _data((2, 8, 4, 4))
    weight.requires_grad_()
    ops.group_norm_silu(x, 4, weight, bias, pre_bias=pre_bias, backend="cpp").sum().backward()
    assert weight.grad is not None and x.grad is None and bias.grad is None and pre_bias.grad is None


# ------------------------------------------------------------------------------ Philox noise

_M32 = 0xFFFFFFFF


def _philox4x32_10(counter, key):
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(10):
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0) & _M32, p1 & _M32, ((p0 >> 32) ^ c3 ^ k1) & _M32, p0 & _M32
        k0, k1 = (k0 + 0x9E3779B9) & _M32, (k1 + 0xBB67AE85) & _M32
    return c0, c1, c2, c3


def test_reference_philox_matches_the_published_answers():
    # Known-answer vectors of Random123 (Salmon et al.) for Philox4x32-10.
    assert _philox4x32_10((0, 0, 0, 0), (0, 0)) == (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)
    assert _philox4x32_10((_M32,) * 4, (_M32, _M32)) == (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)


def _reference_normals(seed, step, count):
    seed, step = seed % 2**64, step % 2**64
    out = []
    for quad in range((count + 3) // 4):
        words = _philox4x32_10((quad & _M32, quad >> 32, step & _M32, step >> 32), (seed & _M32, seed >> 32))
        signed = [w - 2**32 if w >= 2**31 else w for w in words]
        u = [np.float32(~s if s < 0 else s) * np.float32(4.6566127342e-10) for s in signed]
        for u0, u1 in ((u[0], u[1]), (u[2], u[3])):
            r = np.sqrt(-2.0 * np.log(max(float(u0), 1e-7)))
            theta = float(np.float32(6.283185307179586) * u1 - np.float32(3.141592653589793))
            out += [r * np.cos(theta), r * np.sin(theta)]
    return torch.tensor(out[:count], dtype=torch.float64)


@needs_ext
@pytest.mark.parametrize("seed, step", [(7, 3), (-1, 2**33 + 5), (2**40 + 11, 0)])
def test_seeded_noise_is_the_documented_philox_stream(seed, step):
    zeros = torch.zeros(2, 3, 5, 7)
    z = ops.posterior_step(zeros, zeros, state_coef=1.0, output_coef=1.0, coef1=0.0, coef2=0.0,
                           sigma=1.0, seed=seed, step=step, backend="cpp")
    torch.testing.assert_close(z.flatten().double(), _reference_normals(seed, step, z.numel()), rtol=0, atol=1e-5)


@needs_ext
def test_seeded_noise_equals_the_triton_backend():
    pytest.importorskip("triton")
    script = (
        "import torch; from sr3_engine import ops\n"
        "y = torch.zeros(3, 3, 17, 19)\n"
        "kw = dict(state_coef=1.0, output_coef=1.0, coef1=0.0, coef2=0.0, sigma=1.0, seed=11, step=4)\n"
        "a, b = (ops.posterior_step(y, y, backend=name, **kw) for name in ('cpp', 'triton'))\n"
        "print((a - b).abs().max().item())\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, "TRITON_INTERPRET": "1"}, timeout=600)
    assert result.returncode == 0, result.stderr
    assert float(result.stdout.split()[-1]) < 1e-5


# ------------------------------------------------------------------------------ without the extension


@pytest.mark.parametrize("hide, reason", [
    ("import os; os.environ['SR3_ENGINE_SKIP_EXT'] = '1'", "SR3_ENGINE_SKIP_EXT=1 is set"),
    ("import sys; sys.modules['sr3_engine._C'] = None", "sr3_engine._C is not built"),
], ids=["skip-env", "not-built"])
def test_without_the_extension_cpp_says_why_and_native_still_works(hide, reason):
    script = (
        f"{hide}\n"
        "import torch; from sr3_engine import ops\n"
        "x = torch.randn(1, 8, 4, 4)\n"
        "print(ops.why_unavailable('group_norm_silu', 'cpp', x))\n"
        "assert ops.resolve_backend('group_norm_silu', 'auto', x) == 'native'\n"
        "ops.group_norm_silu(x, 4, backend='native')\n"
        "ops.group_norm_silu(x, 4, backend='cpp')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert reason in result.stdout
    assert "RuntimeError: group_norm_silu: backend 'cpp' cannot run on cpu torch.float32" in result.stderr
    assert reason in result.stderr.strip().splitlines()[-1]


# ------------------------------------------------------------------------------ CUDA


@pytest.mark.parametrize("source", sorted((ROOT / "csrc" / "cuda").glob("*.cu")), ids=lambda p: p.name)
def test_cuda_sources_compile_for_sm90(source, tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on PATH")
    result = subprocess.run([nvcc, "-c", "-arch=sm_90", "-std=c++17", "-o", str(tmp_path / "kernel.o"), str(source)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr


@pytest.mark.gpu
@needs_ext
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.float16, 1e-2), (torch.bfloat16, 5e-2)],
                         ids=str)
@pytest.mark.parametrize("shape, groups", [((1, 64, 128, 128), 32), ((5, 64, 7, 9), 16), ((1, 12, 300, 301), 1),
                                           ((2, 6, 1, 1), 3)], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_cuda_kernels_three_way(dtype, atol, shape, groups, channels_last):
    if ops.why_unavailable("group_norm_silu", "cpp", torch.zeros(1, device="cuda")) is not None:
        pytest.skip(ops.why_unavailable("group_norm_silu", "cpp", torch.zeros(1, device="cuda")))
    x, weight, bias, pre_bias = (t.cuda() for t in _data(shape, dtype, channels_last))
    ref = _ref(x, groups, weight, bias, pre_bias)
    native = ops.group_norm_silu(x, groups, weight.to(dtype), bias.to(dtype), pre_bias=pre_bias, backend="native")
    out = ops.group_norm_silu(x, groups, weight, bias, pre_bias=pre_bias, backend="cpp")
    assert out.stride() == x.stride() and torch.equal(out, gn_op(x, groups, weight, bias, pre_bias, 1e-5))
    assert ((out.double() - ref).abs() - 2 * (native.double() - ref).abs() - atol).max() <= 0
    y_t, eps, noise = (torch.randn(shape, device="cuda").to(dtype) for _ in range(3))
    step = ops.posterior_step(y_t, eps, noise=noise, backend="cpp", **STEP)
    step_ref = ops.posterior_step_ref(y_t.double(), eps.double(), noise=noise.double(), **STEP)
    step_native = ops.posterior_step(y_t, eps, noise=noise, backend="native", **STEP)
    assert ((step.double() - step_ref).abs() - 2 * (step_native.double() - step_ref).abs() - atol).max() <= 0
    zeros = torch.zeros(shape, device="cuda")
    seeded = dict(state_coef=1.0, output_coef=1.0, coef1=0.0, coef2=0.0, sigma=1.0, seed=3, step=1)
    torch.testing.assert_close(ops.posterior_step(zeros, zeros, backend="cpp", **seeded).cpu(),
                               ops.posterior_step(zeros.cpu(), zeros.cpu(), backend="cpp", **seeded), rtol=0, atol=1e-5)


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
@pytest.mark.parametrize("architectures, torch_spelling", [("80;90", "8.0;9.0"), ("90a;120-real", "9.0a;12.0"),
                                                           ("75", "7.5")])
def test_torch_is_given_the_extensions_cuda_architectures(tmp_path, architectures, torch_spelling):
    # Without them torch's CMake config falls back to a list from compute_50 on a build host that
    # sees no GPU, which nvcc 13 rejects, and the CUDA kernels would silently not be built.
    script = tmp_path / "arch.cmake"
    script.write_text(f'include("{ROOT / "cmake" / "TorchCudaArchList.cmake"}")\n'
                      f'sr3_torch_cuda_arch_list(out "{architectures}")\nmessage("${{out}}")\n')
    result = subprocess.run(["cmake", "-P", str(script)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == torch_spelling
    assert "sr3_torch_cuda_arch_list(" in (ROOT / "CMakeLists.txt").read_text()
