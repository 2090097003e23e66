"""The Triton kernels (kernels/, installed as sr3_engine.kernels), beyond the generic op tests.

tests/test_ops.py holds every registered backend, triton included, to the float64 references
over the grid of docs/ARCHITECTURE.md ("Tests"). This file covers what is particular to the kernels: the split
reduction and its plan, numerical robustness, the in-kernel noise, the custom ops that
torch.compile and CUDA graphs see, and that the kernels compile for Hopper (which the CPU
interpreter cannot show). Kernels run on CUDA, or on the CPU when the process was started
with TRITON_INTERPRET=1.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sr3_engine import ops

triton = pytest.importorskip("triton", exc_type=ImportError)  # skips with the import error
# Once Triton imports, the kernels must too: an error here is a bug in kernels/, not a skip.
import sr3_engine.kernels as kernels  # noqa: E402
from sr3_engine.kernels import compile_check  # noqa: E402
from sr3_engine.kernels import group_norm_silu as gn  # noqa: E402
from sr3_engine.kernels import posterior_step as ps  # noqa: E402

DEVICE = "cpu" if kernels.INTERPRETED else "cuda"
_CANNOT_RUN = (None if kernels.INTERPRETED or torch.cuda.is_available() else
               "the Triton kernels need CUDA, or TRITON_INTERPRET=1 set before Python starts")
_can_run = pytest.mark.skipif(_CANNOT_RUN is not None, reason=_CANNOT_RUN or "")


def runs_kernels(test):
    """A test of the kernels themselves: on CUDA when there is a GPU (gpu-check runs it there), else interpreted."""
    return pytest.mark.cuda(_can_run(test))


compiled_on_gpu = pytest.mark.skipif(not torch.cuda.is_available() or kernels.INTERPRETED,
                                     reason="needs a CUDA device and compiled (not interpreted) kernels")

ATOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}
HALF_ULP = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def _inputs(batch, channels, height, width, dtype, channels_last, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, height, width, generator=g) * 3 + 1.5
    weight = torch.randn(channels, generator=g) * 0.5 + 1
    bias = torch.randn(channels, generator=g) * 0.5
    pre_bias = torch.randn(batch, channels, generator=g)
    x, weight, bias, pre_bias = (t.to(DEVICE, dtype) for t in (x, weight, bias, pre_bias))
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    return x, weight, bias, pre_bias


def _assert_three_way(out, x, groups, weight, bias, pre_bias):
    """docs/ARCHITECTURE.md, "Tests": |kernel - ref64| <= 2 |native - ref64| + atol, elementwise."""
    ref64 = gn.group_norm_silu_ref(x.double(), groups, weight.double(), bias.double(),
                                    pre_bias=None if pre_bias is None else pre_bias.double())
    native = ops.group_norm_silu(x, groups, weight, bias, pre_bias=pre_bias, backend="native")
    excess = ((out.double() - ref64).abs() - 2 * (native.double() - ref64).abs() - ATOL[x.dtype]).max().item()
    assert excess <= 0, f"exceeds the three-way bound by {excess:.3g}"


# ------------------------------------------------------------------------ group_norm_silu


SPLIT_CASES = [  # (batch, channels, groups, height, width, split, tile)
    (2, 64, 16, 7, 9, 3, 64),      # uneven chunks: 63 positions in 3 chunks of 21, tiles of 16
    (1, 48, 16, 5, 7, 4, 32),      # 3 channels per group: the padded (non power of two) path
    (1, 16, 4, 16, 16, 5, 32),     # several tiles per chunk, last chunk shorter
]


@runs_kernels
@pytest.mark.parametrize("dtype", list(ATOL), ids=str)
@pytest.mark.parametrize("case", SPLIT_CASES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_split_reduction_matches_the_reference(dtype, case, channels_last):
    batch, channels, groups, height, width, split, tile = case
    x, weight, bias, pre_bias = _inputs(batch, channels, height, width, dtype, channels_last)
    p = gn.plan(batch, channels, groups, height * width, channels_last, x.element_size(), 1, split=split, tile=tile)
    assert p.num_chunks > 1 and p.chunk > p.block_s, f"not split into chunks of several tiles: {p}"
    out = gn.group_norm_silu_triton(x, groups, weight, bias, pre_bias=pre_bias, split=split, tile=tile)
    assert out.dtype == dtype and out.is_contiguous(memory_format=ops.dense_format(x))
    _assert_three_way(out, x, groups, weight, bias, pre_bias)


@pytest.mark.parametrize("batch", [1, 16])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_plan_fills_an_h100_and_bounds_the_partials(batch, channels_last):
    sms, (channels, groups, hw), item = 132, (64, 32, 128 * 128), 2
    p = gn.plan(batch, channels, groups, hw, channels_last, item, 2 * sms)
    programs = p.num_group_blocks * p.num_chunks * batch
    block_c = p.groups_per_block * (channels // groups)
    assert programs >= 1.9 * sms, p
    assert p.chunk % p.block_s == 0, p
    # An apply program reads its chunk's partials (2 floats per chunk and channel): <= 1/8 of its traffic.
    assert p.num_chunks * block_c * 8 <= p.chunk * block_c * item * 2 / 8, p
    if channels_last:
        assert block_c * item >= 16, p


def test_plan_keeps_odd_shapes_within_the_tile_budget():
    for batch, channels, groups, hw in [(1, 1, 1, 1), (3, 4096, 1, 2), (2, 48, 16, 63), (1, 8, 8, 10**6)]:
        for channels_last in (False, True):
            p = gn.plan(batch, channels, groups, hw, channels_last, 4, 264)
            cpg_p2 = triton.next_power_of_2(channels // groups)
            assert p.groups_per_block * cpg_p2 * p.block_s <= max(4096, cpg_p2), p
            assert p.block_s <= triton.next_power_of_2(hw) and p.chunk >= p.block_s and 1 <= p.num_warps <= 8, p


@runs_kernels
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # the interpreter's exp(-h)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_statistics_survive_a_large_mean(channels_last):
    # mean 3000, std 1: E[x^2] - mean^2 in float32 would be off by ~2 in the variance.
    x = (torch.randn(2, 32, 16, 16, generator=torch.Generator().manual_seed(5)) + 3000).to(DEVICE)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    ref64 = gn.group_norm_silu_ref(x.double(), 8, None, None)
    out = gn.group_norm_silu_triton(x, 8, split=3, tile=64)
    assert (out.double() - ref64).abs().max().item() < 2e-3


@runs_kernels
def test_inputs_in_other_layouts_are_copied_and_optional_tensors_may_be_missing():
    x, weight, bias, pre_bias = _inputs(2, 16, 6, 10, torch.float32, False)
    strided = x[:, :, :, ::2]
    strided_pre_bias = pre_bias.t().contiguous().t()
    out = gn.group_norm_silu_triton(strided, 4, None, bias, pre_bias=strided_pre_bias)
    assert out.is_contiguous()
    _assert_three_way(out, strided.contiguous(), 4, torch.ones_like(weight), bias, pre_bias)


@runs_kernels
@pytest.mark.parametrize("optional", [True, False], ids=["all-tensors", "no-optional-tensors"])
def test_gradients_match_float64(optional):
    x, weight, bias, pre_bias = _inputs(2, 16, 5, 3, torch.float32, True, seed=3)
    given = (weight, bias, pre_bias) if optional else (None, None, None)
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (x, *given)]
    leaves64 = [t.detach().double().requires_grad_() if t is not None else None for t in (x, *given)]
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    out = ops.group_norm_silu(leaves[0], 4, leaves[1], leaves[2], pre_bias=leaves[3], backend="triton")
    (out * upstream).sum().backward()
    ref = gn.group_norm_silu_ref(leaves64[0], 4, leaves64[1], leaves64[2], pre_bias=leaves64[3])
    (ref * upstream.double()).sum().backward()
    for got, want in zip(leaves, leaves64):
        if got is not None:
            torch.testing.assert_close(got.grad.double(), want.grad, rtol=1e-4, atol=1e-5)


@runs_kernels
@pytest.mark.parametrize("optional", [True, False], ids=["all-tensors", "no-optional-tensors"])
def test_group_norm_silu_custom_op_passes_opcheck(optional):
    x, weight, bias, pre_bias = _inputs(1, 8, 3, 2, torch.float32, False)
    args = (x.requires_grad_(), 4, weight, bias, pre_bias, 1e-5) if optional else (x, 4, None, None, None, 1e-5)
    torch.library.opcheck(gn.group_norm_silu_op, args)


@pytest.mark.parametrize("call, message", [
    (lambda x: gn.group_norm_silu_triton(x.int(), 4), "dtype torch.int32"),
    (lambda x: gn.group_norm_silu_triton(x[0], 4), "4-D"),
    (lambda x: gn.group_norm_silu_triton(x, 3), "not divisible by num_groups=3"),
    (lambda x: gn.group_norm_silu_triton(x, 4, torch.ones(4, device=x.device)), r"weight must have shape \(8,\)"),
    (lambda x: gn.group_norm_silu_triton(x, 4, pre_bias=torch.ones(8, device=x.device)), "pre_bias must have shape"),
    (lambda x: gn.group_norm_silu_triton(x.new_zeros(1, 8192, 1, 1), 1), "exceed the kernel limit of 4096"),
])
@runs_kernels
def test_group_norm_silu_launcher_rejects_bad_arguments(call, message):
    with pytest.raises(ValueError, match=message):
        call(torch.randn(2, 8, 3, 3, device=DEVICE))


def test_the_backend_is_registered_with_its_predicate():
    x = torch.zeros(1, 4, 2, 2)
    reason = ops.why_unavailable("group_norm_silu", "triton", x)
    if kernels.INTERPRETED:
        assert reason is None and ops.why_unavailable("posterior_step", "triton", x) is None
    else:
        assert "TRITON_INTERPRET=1" in reason
    assert "triton" not in ops.available_backends("group_norm_silu", x.to(torch.int32))


# --------------------------------------------------------------------------- posterior_step


STEP = dict(state_coef=1.7, output_coef=1.37, coef1=0.21, coef2=0.83, sigma=0.12)
NOISE_ONLY = dict(state_coef=1.0, output_coef=1.0, coef1=0.0, coef2=0.0, sigma=1.0)


def _noise(numel, **kwargs):
    """With y_t = eps = 0 the update is sigma * z: the kernel's noise itself."""
    zeros = torch.zeros(numel, device=DEVICE)
    return ps.posterior_step_triton(zeros, zeros, **NOISE_ONLY, **kwargs)


@runs_kernels
@pytest.mark.parametrize("dtypes", [(torch.float32,) * 3, (torch.float16,) * 3, (torch.bfloat16,) * 3,
                                    (torch.float32, torch.bfloat16, torch.float16)], ids=str)
@pytest.mark.parametrize("clip", [True, False])
def test_posterior_step_is_the_reference_rounded_once(dtypes, clip):
    g = torch.Generator().manual_seed(2)
    y_t, eps, noise = ((torch.randn(3, 3, 17, 19, generator=g) * 1.5).to(DEVICE, dt) for dt in dtypes)
    out = ps.posterior_step_triton(y_t, eps, noise=noise, clip=clip, **STEP)
    y64, eps64, noise64 = y_t.double(), eps.double(), noise.double()
    ref64 = ps.posterior_step_ref(y64, eps64, noise=noise64, clip=clip, **STEP)
    # float32 arithmetic (a few roundings, relative to the size of the terms), then one
    # rounding to y_t's dtype: half an ulp of the result on a GPU, a whole one under Triton
    # 3.6's interpreter, which truncates float32 to bfloat16 instead of rounding.
    terms = ps.posterior_step_ref(y64.abs(), -eps64.abs(), noise=noise64.abs(), clip=False, **STEP)
    last_rounding = HALF_ULP[dtypes[0]] * (2 if kernels.INTERPRETED and dtypes[0] == torch.bfloat16 else 1)
    bound = last_rounding * ref64.abs() + 8 * HALF_ULP[torch.float32] * terms
    assert out.dtype == dtypes[0]
    assert ((out.double() - ref64).abs() <= bound).all(), ((out.double() - ref64).abs() - bound).max()


@runs_kernels
def test_in_kernel_noise_is_standard_normal_and_uncorrelated():
    z = _noise(1 << 16, seed=11, step=5).double()
    assert abs(z.mean().item()) < 0.02 and abs(z.std().item() - 1) < 0.02
    assert abs((z.abs() < 1).double().mean().item() - 0.6827) < 0.01
    for lag in (1, 2, 3, 4):  # within a Philox call's four normals, and across calls
        assert abs(torch.corrcoef(torch.stack([z[:-lag], z[lag:]]))[0, 1].item()) < 0.02, lag


@runs_kernels
def test_noise_is_a_function_of_seed_step_and_index_alone():
    z = _noise(3000, seed=7, step=3)
    torch.testing.assert_close(_noise(3000, seed=7, step=3), z, rtol=0, atol=0)
    torch.testing.assert_close(_noise(20000, seed=7, step=3)[:3000], z, rtol=0, atol=0)  # other grid, block
    others = (dict(seed=7, step=4), dict(seed=8, step=3), dict(seed=7, step=3 + 2**32), dict(seed=7 + 2**32, step=3))
    for other in others:  # the high words of seed and step count too
        assert (_noise(3000, **other) != z).float().mean() > 0.99, other


@runs_kernels
@pytest.mark.parametrize("seed", [0, 7, -5, 2**40 + 3, 2**64 - 1])
def test_a_seed_tensor_draws_what_the_int_seed_draws(seed):
    as_tensor = torch.tensor(ops.as_int64_seed(seed), dtype=torch.int64, device=DEVICE)
    torch.testing.assert_close(_noise(1000, seed=as_tensor, step=2), _noise(1000, seed=seed, step=2), rtol=0, atol=0)


@runs_kernels
def test_seeded_noise_through_the_dispatcher_and_custom_op():
    y_t = torch.zeros(2, 3, 8, 8, device=DEVICE)
    seed = torch.tensor(123, device=DEVICE)
    via_ops = ops.posterior_step(y_t, y_t, seed=seed, step=1, backend="triton", **NOISE_ONLY)
    torch.testing.assert_close(via_ops, ops.posterior_step(y_t, y_t, seed=123, step=1, backend="triton", **NOISE_ONLY))
    torch.testing.assert_close(via_ops.flatten(), _noise(y_t.numel(), seed=123, step=1), rtol=0, atol=0)


@runs_kernels
def test_out_may_be_y_t_and_layouts_are_kept():
    g = torch.Generator().manual_seed(4)
    y_t, eps, noise = (torch.randn(2, 3, 5, 6, generator=g).to(DEVICE) for _ in range(3))
    y_t = y_t.to(memory_format=torch.channels_last)
    expected = ps.posterior_step_triton(y_t, eps, noise=noise, **STEP)
    assert expected.is_contiguous(memory_format=torch.channels_last)
    in_place = y_t.clone()
    assert ps.posterior_step_triton(in_place, eps, noise=noise, out=in_place, **STEP) is in_place
    torch.testing.assert_close(in_place, expected, rtol=0, atol=0)


@runs_kernels
def test_sigma_zero_ignores_the_seed():
    y_t = torch.randn(1, 3, 4, 4, device=DEVICE)
    quiet = {**STEP, "sigma": 0.0}
    torch.testing.assert_close(ps.posterior_step_triton(y_t, y_t, seed=1, **quiet),
                               ps.posterior_step_triton(y_t, y_t, **quiet), rtol=0, atol=0)


@runs_kernels
@pytest.mark.parametrize("seed_kind", ["noise", "tensor", "int"])
def test_posterior_step_custom_op_passes_opcheck(seed_kind):
    y_t, eps, noise = (torch.randn(1, 3, 4, 4, device=DEVICE) for _ in range(3))
    seed_tensor = torch.tensor(3, device=DEVICE) if seed_kind == "tensor" else None
    args = (y_t, eps, noise if seed_kind == "noise" else None, seed_tensor, 3 if seed_kind == "int" else None, 2,
            *STEP.values(), True)
    torch.library.opcheck(ps.posterior_step_op, args)


@runs_kernels
@pytest.mark.parametrize("kwargs, message", [
    (dict(pred=torch.zeros(1, 3, 4, 5)), r"pred has shape \(1, 3, 4, 5\)"),
    (dict(noise=torch.zeros(1, 3, 4, 4, dtype=torch.int32)), "noise has dtype torch.int32"),
    (dict(seed=torch.tensor(1.0)), "a seed tensor must be one int64"),
    (dict(seed=3, noise=torch.zeros(1, 3, 4, 4)), "either noise or seed"),
    (dict(), "needs noise or a seed"),
    (dict(seed=1, out=torch.zeros(1, 3, 4, 4, dtype=torch.float16)), "out has dtype torch.float16"),
])
def test_posterior_step_launcher_rejects_bad_arguments(kwargs, message):
    y_t = torch.zeros(1, 3, 4, 4, device=DEVICE)
    kwargs = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    with pytest.raises(ValueError, match=message):
        ps.posterior_step_triton(y_t, kwargs.pop("pred", y_t), **STEP, **kwargs)


# ------------------------------------------------------------------- compiled for Hopper

_NVIDIA_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def hopper_report() -> None:
    """Compile the kernels as the JIT would for an H100 (sm_90) launch at the benchmark shapes
    and print, per kernel, its global load/store widths and ptxas's register/local-memory use.
    Needs no GPU; runs in a process without TRITON_INTERPRET."""

    def build(fn, args, constexprs, num_warps, what=""):
        compiled = compile_check.compile_launch(fn, args, constexprs, num_warps, 90)
        cubin = Path(os.environ["HOPPER_REPORT_DIR"]) / f"{fn.__name__}.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([str(_NVIDIA_BIN / "cuobjdump"), "-res-usage", str(cubin)],
                               capture_output=True, text=True, check=True).stdout
        instructions = sorted(set(re.findall(r"(?:ld|st)\.global[\w.:]*|\w+\.approx", compiled.asm["ptx"])))
        print(fn.__name__, " ".join(re.findall(r"(?:REG|LOCAL):\d+", usage)), " ".join(instructions))

    for batch, channels_last in ((1, False), (1, True), (16, False), (16, True)):
        p = gn.plan(batch, 64, 32, 128 * 128, channels_last, 2, 2 * 132)
        print(f"# group_norm_silu batch {batch} {'nhwc' if channels_last else 'nchw'} {p}")
        for launch in compile_check.group_norm_silu_launches(batch, 64, 32, 128 * 128, channels_last,
                                                             torch.bfloat16, 132):
            build(*launch)
    for noise, seed_in_memory in ((1, False), (2, False), (2, True)):
        print(f"# posterior_step noise {'drawn' if noise == 2 else 'given'}, seed in memory {seed_in_memory}")
        build(ps._posterior_step_kernel,
              dict(y_ptr=torch.float32, pred_ptr=torch.bfloat16, noise_ptr=torch.float32 if noise == 1 else None,
                   out_ptr=torch.float32, seed_ptr=torch.int64 if seed_in_memory else None, seed=5, step=3,
                   numel=16 * 3 * 128 * 128, state_coef=1.0, output_coef=1.0, coef1=0.5,
                   coef2=0.5, sigma=0.1),
              dict(CLIP=True, NOISE=noise, SEED_IN_MEMORY=seed_in_memory, FAST_MATH=True, BLOCK=1024), 4)


def test_every_compile_check_launch_names_exactly_its_kernels_arguments():
    # The compile check binds arguments by name: a renamed kernel argument must fail here, on
    # every machine, rather than only where the kernels are compiled.
    for fn, args, constexprs, _, what in compile_check.launches(90):
        assert set(args) | set(constexprs) == set(fn.arg_names), f"{fn.__name__} {what}"


@pytest.mark.skipif(not (_NVIDIA_BIN / "cuobjdump").exists(), reason="this Triton build has no NVIDIA backend tools")
def test_the_compile_check_covers_the_1x1_bottleneck(tmp_path):
    # The interpreter does not specialise an int argument equal to 1 into a constant; compiled
    # Triton does, and a 1x1 feature map once made the GroupNorm kernel fail to compile. The
    # whole grid runs as `make check-triton`; here its 1x1 launches for sm_90.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path / "cache"))
    result = subprocess.run([sys.executable, "-m", "sr3_engine.kernels.compile_check", "--arch", "90", "--match",
                             "x1 "], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    compiled = [line for line in result.stdout.splitlines() if line.startswith("ok ")]
    assert len(compiled) == 2 * 2 * 2 * 3 and all("x1 n" in line for line in compiled), result.stdout


@pytest.mark.skipif(not (_NVIDIA_BIN / "cuobjdump").exists(), reason="this Triton build has no NVIDIA backend tools")
def test_kernels_compile_for_hopper_with_16_byte_accesses_and_no_spills(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(HOPPER_REPORT_DIR=str(tmp_path), TRITON_CACHE_DIR=str(tmp_path / "cache"))
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", "from tests.test_kernels import hopper_report; hopper_report()"],
                            cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    kernel_lines = [line for line in lines if not line.startswith("#")]
    assert len(kernel_lines) == 11, result.stdout
    for header, line in zip(lines[-6::2], lines[-5::2]):
        if "drawn" in header:  # Box-Muller on the SFU, not libdevice's long sin/cos/log
            assert all(f"{op}.approx" in line for op in ("sin", "cos", "lg2")), line
    for line in kernel_lines:
        assert "LOCAL:0" in line, line  # nothing spilled to local memory
        # x, y_t, eps and the output move in 16-byte vectors (v4.b32 = 8 bf16 or 4 fp32).
        assert re.search(r"ld\.global\.L1::evict_\w+\.L2::cache_hint\.v4\.b32", line), line
        if not line.startswith("_stats_kernel"):
            assert "st.global.v4.b32" in line, line


# --------------------------------------------------------------------------------- on a GPU


@pytest.mark.gpu
@compiled_on_gpu
@pytest.mark.parametrize("batch", [1, 16])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_benchmark_shapes_with_the_planned_splits_on_gpu(batch, channels_last, dtype):
    x, weight, bias, pre_bias = _inputs(batch, 64, 128, 128, dtype, channels_last)
    out = ops.group_norm_silu(x, 32, weight, bias, pre_bias=pre_bias, backend="triton")
    _assert_three_way(out, x, 32, weight, bias, pre_bias)


@pytest.mark.gpu
@compiled_on_gpu
def test_cuda_graph_replays_both_ops_and_draws_new_noise_from_the_seed_tensor():
    x, weight, bias, pre_bias = _inputs(2, 64, 32, 32, torch.bfloat16, True)
    y_t = torch.randn(2, 3, 32, 32, device="cuda")
    eps = torch.randn(2, 3, 32, 32, device="cuda", dtype=torch.bfloat16)
    seed = torch.tensor(1, device="cuda")

    def step():
        return (ops.group_norm_silu(x, 32, weight, bias, pre_bias=pre_bias, backend="triton"),
                ops.posterior_step(y_t, eps, seed=seed, step=4, backend="triton", **STEP))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # compile and warm up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        normed, updated = step()
    for value in (1, 99):
        seed.fill_(value)
        graph.replay()
        torch.cuda.synchronize()
        eager_normed, eager_updated = step()
        torch.testing.assert_close(normed, eager_normed, rtol=0, atol=0)
        torch.testing.assert_close(updated, eager_updated, rtol=0, atol=0)
    assert not torch.equal(updated, ops.posterior_step(y_t, eps, seed=1, step=4, backend="triton", **STEP))


@runs_kernels
def test_torch_compile_takes_both_ops_whole():
    x, weight, bias, pre_bias = _inputs(2, 16, 4, 4, torch.float32, False)
    y_t = torch.randn(2, 3, 4, 4, device=DEVICE)

    def step(x, y_t):
        h = ops.group_norm_silu(x, 4, weight, bias, pre_bias=pre_bias, backend="triton")
        return h, ops.posterior_step(y_t, y_t, seed=3, step=1, backend="triton", **STEP)

    expected = step(x, y_t)  # eager first: fills the predicate's caches, as a real caller would
    compiled = torch.compile(step, fullgraph=True, backend="inductor" if DEVICE == "cuda" else "aot_eager")
    for got, want in zip(compiled(x, y_t), expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
