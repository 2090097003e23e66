"""What every benchmark row carries: the device, its peaks, the versions, FLOPs, and a clock.

Peaks. A row's FLOP fraction is taken of the device's peak in the precision it computes in
(`DeviceInfo.peak_flops`): bf16 rows of the bf16 peak where the device computes bf16 natively
(`runtime.engine.native_bf16`), else of the fp32 peak, since an emulated bf16 product runs on
the fp32 units (the emulated bf16 matmul peak is far below them, and fractions of it came out
at several times 100%); fp32 rows of the fp32 peak, which on a GPU is the TF32 tensor-core
figure while cuDNN may use TF32 (PyTorch's default), else its fp32 figure. On a GPU the peaks
and the HBM bandwidth come from the data sheet (the table below, matched on the device name).
On a CPU, or a GPU not in the table, there is no dependable data sheet figure, so they are
measured here: the best of a few bf16 and fp32 matmuls of up to 2048^3, and a 256 MiB tensor
copy (read + write). Each can be overridden (`--peak-tflops`, `--peak-fp32-tflops`,
`--peak-gbps`); the source goes into every row. A fraction above 1 means a peak was
underestimated: the row keeps it, and the report prints it as an error, not a figure.

Clock. CUDA work is asynchronous, so on a CUDA device the clock synchronises the device and
then reads perf_counter: a round starts and ends at points where every earlier kernel has
finished. (CUDA events would give the same bounds, but their elapsed time is float32
milliseconds from an origin, which loses microseconds over a long session.) Per-op rounds
on CUDA replay a CUDA graph of many calls (see `CallGraph`), so that what is timed is the
kernels, not Python and launch overhead.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import itertools
import math
import os
import platform
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

import sr3_engine as sr3
from sr3_engine.runtime import model_dir
from sr3_engine.runtime.engine import AUTO, native_bf16

# (substring of torch.cuda.get_device_name(), dense bf16 TFLOP/s, fp32 (CUDA core) TFLOP/s, memory
# TB/s, data sheet), first match wins. Dense TF32 is half the dense bf16 figure on all of them.
GPU_DATA_SHEETS = (
    ("H200 NVL", 835.5, 60.0, 4.8, "NVIDIA H200 NVL data sheet"),
    ("H200", 989.4, 67.0, 4.8, "NVIDIA H200 SXM data sheet"),
    ("H100 NVL", 835.5, 60.0, 3.9, "NVIDIA H100 NVL data sheet"),
    ("H100 PCIe", 756.5, 51.0, 2.0, "NVIDIA H100 PCIe data sheet"),
    ("H100", 989.4, 67.0, 3.35, "NVIDIA H100 SXM5 data sheet"),
    ("A100-SXM4-80GB", 312.0, 19.5, 2.039, "NVIDIA A100 SXM4 80GB data sheet"),
    ("A100-SXM4-40GB", 312.0, 19.5, 1.555, "NVIDIA A100 SXM4 40GB data sheet"),
    ("A100 80GB PCIe", 312.0, 19.5, 1.935, "NVIDIA A100 PCIe 80GB data sheet"),
)
# A MIG slice has a fraction of the GPU's peaks, and a Grace Hopper (GH200) has other memory
# than its H100/H200 namesakes: those are measured.
NOT_IN_DATA_SHEETS = ("MIG", "GH200")


@dataclasses.dataclass(frozen=True)
class DeviceInfo:
    """The device a run measured and the peaks its fractions are taken of."""

    device: str
    name: str
    peak_bf16_flops: float
    peak_bytes_per_s: float
    peak_source: str
    versions: dict
    peak_fp32_flops: float
    native_bf16: bool

    def peak_flops(self, dtype: torch.dtype) -> tuple[float, str]:
        """(FLOP/s, what it is the peak of) for work in `dtype`: the peak of the precision the device
        computes that work in."""
        if dtype == torch.float32:
            return self.peak_fp32_flops, "fp32"
        half_native = self.native_bf16 if dtype == torch.bfloat16 else self.device == "cuda" and self.native_bf16
        if half_native:
            return self.peak_bf16_flops, "bf16"
        return self.peak_fp32_flops, f"fp32 ({DTYPE_NAMES[dtype]} is emulated in fp32 here)"

    def row(self) -> dict:
        """The fields every benchmark row's extra_info starts with."""
        return {
            "device": self.device,
            "device_name": self.name,
            # Significant figures, not decimals: an emulated bf16 matmul reaches a few GFLOP/s.
            "peak_bf16_tflops": float(f"{self.peak_bf16_flops / 1e12:.4g}"),
            "peak_fp32_tflops": float(f"{self.peak_fp32_flops / 1e12:.4g}"),
            "native_bf16": self.native_bf16,
            "peak_gbps": round(self.peak_bytes_per_s / 1e9, 1),
            "peak_source": self.peak_source,
            **self.versions,
        }


def versions() -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    try:
        import onnxruntime

        onnxruntime_version = onnxruntime.__version__
    except ImportError:
        onnxruntime_version = "not installed"
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda or "none",
        "onnxruntime": onnxruntime_version,
        "sr3_engine": getattr(sr3, "__version__", "unknown"),
        "torch_threads": torch.get_num_threads(),
        # PyTorch's defaults let fp32 convolutions run on TF32 tensor cores: the "fp32" baseline depends on them.
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else "none",
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
    }


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} cores"


def data_sheet(name: str, tf32: bool = True) -> tuple[float, float, float, str] | None:
    """(bf16 FLOP/s, fp32 FLOP/s, bytes/s, source) for a GPU named in GPU_DATA_SHEETS, else None.
    The fp32 figure is dense TF32 (half of bf16) when `tf32` (cuDNN may use it for fp32
    convolutions), else the CUDA cores' fp32."""
    if any(marker in name for marker in NOT_IN_DATA_SHEETS):
        return None
    for key, tflops, fp32_tflops, tbps, source in GPU_DATA_SHEETS:
        if key in name:
            fp32 = tflops / 2 if tf32 else fp32_tflops
            return tflops * 1e12, fp32 * 1e12, tbps * 1e12, f"{source} (fp32: {'TF32' if tf32 else 'CUDA cores'})"
    return None


def measure_flops(device: torch.device, dtype: torch.dtype = torch.bfloat16, size: int = 2048, repeats: int = 5,
                  budget_s: float = 0.5) -> tuple[float, int]:
    """(best FLOP/s of a `dtype` matmul, the side it was measured at). The side doubles from 256
    up to `size` while one product takes under `budget_s`: a CPU without bf16 instructions
    emulates them and takes minutes for one 2048^3 product, and its peak is reached long before that."""
    side = min(256, size)
    while True:
        a = torch.randn(side, side, device=device, dtype=dtype)
        b = torch.randn(side, side, device=device, dtype=dtype)
        seconds = _best_time(lambda: a @ b, device, 1)
        if side >= size or seconds * 8 > budget_s:
            return 2 * side**3 / _best_time(lambda: a @ b, device, repeats), side
        side *= 2


def measure_bytes_per_s(device: torch.device, mebibytes: int = 256, repeats: int = 5) -> float:
    source = torch.empty(mebibytes * 2**20 // 4, device=device, dtype=torch.float32)
    target = torch.empty_like(source)
    return 2 * source.numel() * 4 / _best_time(lambda: target.copy_(source), device, repeats)


def _best_time(fn, device: torch.device, repeats: int) -> float:
    clock = clock_for(device)
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = clock()
        fn()
        best = min(best, clock() - start)
    return best


def resolve_device(choice: str, *, collect_only: bool = False) -> torch.device:
    """`auto` (CUDA when torch sees a GPU), `cpu` or `cuda`; ValueError when CUDA is asked for and
    absent, unless the run only collects (lists the rows it would measure)."""
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available() and not collect_only:
        raise ValueError("--device cuda: torch sees no CUDA device here")
    return torch.device(choice)


def clock_for(device: torch.device):
    """The timer of every measurement on `device`: perf_counter, after a synchronise on CUDA."""
    return CudaSyncClock(device) if device.type == "cuda" else time.perf_counter


def describe(device: torch.device, peak_tflops: float | None = None, peak_gbps: float | None = None,
             peak_fp32_tflops: float | None = None) -> DeviceInfo:
    name = device_name(device)
    sheet = data_sheet(name, torch.backends.cudnn.allow_tf32) if device.type == "cuda" else None
    size = 8192 if device.type == "cuda" else 2048  # the largest side measured: a GPU needs 8192 to near its peak
    if sheet is not None:
        flops, fp32_flops, bandwidth, source = sheet
    else:
        # Only what is not given is measured.
        flops, side = measure_flops(device, torch.bfloat16, size) if peak_tflops is None else (None, None)
        fp32_flops, fp32_side = (measure_flops(device, torch.float32, size) if peak_fp32_tflops is None
                                 else (None, None))
        bandwidth = measure_bytes_per_s(device) if peak_gbps is None else None
        measured = [what for what, value in ((f"best {side}^3 bf16 matmul", flops),
                                             (f"best {fp32_side}^3 fp32 matmul", fp32_flops),
                                             ("256 MiB copy", bandwidth)) if value is not None]
        source = f"measured here: {', '.join(measured)}" if measured else "nothing measured"
    for option, value in (("--peak-tflops", peak_tflops), ("--peak-fp32-tflops", peak_fp32_tflops),
                          ("--peak-gbps", peak_gbps)):
        if value is not None:
            source = f"given ({option} {value}); " + source
    flops = peak_tflops * 1e12 if peak_tflops is not None else flops
    fp32_flops = peak_fp32_tflops * 1e12 if peak_fp32_tflops is not None else fp32_flops
    bandwidth = peak_gbps * 1e9 if peak_gbps is not None else bandwidth
    return DeviceInfo(device.type, name, flops, bandwidth, source, versions(), fp32_flops, native_bf16(device))


def unet_config(name: str) -> sr3.UNetConfig:
    """A named UNetConfig, or the config of the bundled model of that name."""
    if name in sr3.NAMED_UNET_CONFIGS:
        return sr3.UNetConfig.named(name)
    return model_dir.read_spec(model_dir.resolve(name)).model


@functools.lru_cache(maxsize=None)
def flops_per_image(config_name: str, height: int, width: int) -> int:
    """FLOPs of one denoiser call on one image, counted by torch.utils.flop_counter on meta tensors
    (convolutions, attention matmuls and linears; the elementwise work is not counted)."""
    with torch.device("meta"):
        model = sr3.SR3UNet(unet_config(config_name)).eval()
        image = torch.zeros(1, 3, height, width)
        level = torch.zeros(1)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(image, image, level)
    return int(counter.get_total_flops())


class CudaSyncClock:
    """A pytest-benchmark timer: perf_counter read after a device-wide synchronise."""

    def __init__(self, device: torch.device):
        self.device = device

    def __call__(self) -> float:
        torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def __repr__(self) -> str:
        return f"CudaSyncClock({self.device})"


class CallGraph:
    """`calls` calls of fn(*args, **kwargs) captured in one CUDA graph, cycling through copies of
    the inputs made by `make_inputs()` (enough copies to exceed twice the L2 cache, at most
    `max_copies`), so that a replay times the kernels, and each call reads from memory as it
    would inside a model. `output` is the last call's result."""

    def __init__(self, fn, make_inputs, bytes_per_call: int, device: torch.device, *, min_calls: int = 20,
                 max_copies: int = 2048):
        l2_bytes = torch.cuda.get_device_properties(device).L2_cache_size
        copies = max(1, min(max_copies, math.ceil(2 * l2_bytes / bytes_per_call)))
        self.calls = max(min_calls, copies)
        self._inputs = [make_inputs() for _ in range(copies)]
        # Warm-up off the capture stream compiles (or autotunes) every kernel, so capture records launches only.
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            args, kwargs = self._inputs[0]
            fn(*args, **kwargs)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            for i in range(self.calls):
                args, kwargs = self._inputs[i % copies]
                self.output = fn(*args, **kwargs)

    def replay(self) -> None:
        self.graph.replay()


# The engine backends whose device memory goes through PyTorch's allocator, where call_memory can see it.
TORCH_ALLOCATED_BACKENDS = ("eager", "compile", "fused")


def call_memory(engine: sr3.SR3Engine, run, device: torch.device) -> dict:
    """What one call of `run()` holds on a CUDA device at its peak, in three parts:

    - `weight_bytes`: the parameters and buffers of the engine's module;
    - `graph_pool_bytes`: for a backend that keeps CUDA graphs (it has `release_graphs`), what
      stays reserved after a call that captures afresh (its graphs are dropped first): the
      graphs' private pools, where the fused backend's activations live, and their static
      buffers; 0 for the others;
    - `transient_peak_bytes`: the most the next call (a replay) allocates above what was
      allocated before it.

    `peak_memory_bytes` is their sum: the call's own, not the other engines a session keeps, and
    not missing the graph pool that max_memory_allocated cannot see during a replay."""
    graph_pool = 0
    release = getattr(engine.backend, "release_graphs", None)
    if release is not None:
        release()
        gc.collect()
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        reserved_before = torch.cuda.memory_reserved(device)
        run()
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        graph_pool = max(0, torch.cuda.memory_reserved(device) - reserved_before)
    allocated_before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    run()
    torch.cuda.synchronize(device)
    transient = max(0, torch.cuda.max_memory_allocated(device) - allocated_before)
    weights = sum(t.numel() * t.element_size() for t in itertools.chain(engine.model.parameters(),
                                                                      engine.model.buffers()) if t.device.type == "cuda")
    return {"weight_bytes": weights, "graph_pool_bytes": graph_pool, "transient_peak_bytes": transient,
            "peak_memory_bytes": weights + graph_pool + transient}


@dataclasses.dataclass(frozen=True)
class Problem:
    """What an end-to-end row samples: `config` is a named UNetConfig (random weights, seeded) or a
    bundled model's name (its weights); `variants` limits the engine variants measured on it
    (variant ids; None: all of the device's); `tile` and `tile_overlap`, when given, sample in
    tiles of that side (output pixels) instead of whole."""

    config: str
    lr_size: int
    scale: int
    batches: tuple[int, ...]
    steps: int = 100
    variants: tuple[str, ...] | None = None
    tile: int | None = None
    tile_overlap: int | None = None

    @property
    def size(self) -> int:
        return self.lr_size * self.scale

    @property
    def label(self) -> str:
        """The prefix of its rows' ids (after the device's first problem, which has none)."""
        return self.config + (f"-{self.size}px-tile{self.tile}" if self.tile is not None else "")

    def measures(self, variant: "Variant") -> bool:
        return self.variants is None or variant.id in self.variants


# Batch 16 on CUDA because the goals name it (fused >= 2.5x eager fp32 there). On the CPU the
# tiny config shows the per-call overhead of each backend, and the bundled demo-x4 model at
# 64x64 -> 256x256 what a user upscaling a photo runs; a few steps suffice there, since every
# step costs the same, and bf16 only on the fused backend: without AVX-512 BF16 the eager and
# compiled bf16 convolutions of that size take minutes. The tiled problems run the path an image
# larger than memory takes (fused on CUDA: one captured denoiser per tile-batch shape, replayed
# across tiles and steps), against the eager baseline on the same tiles.
PROBLEMS = {
    "cuda": (Problem("sr3-16-128", lr_size=16, scale=8, batches=(1, 8, 16, 32)),
             Problem("sr3-16-128", lr_size=64, scale=8, batches=(1,), steps=20, variants=("fused-bf16",),
                     tile=128, tile_overlap=32)),
    "cpu": (Problem("tiny", lr_size=8, scale=4, batches=(1, 8, 32)),
            Problem("demo-x4", lr_size=64, scale=4, batches=(1, 4), steps=4,
                    variants=("eager-fp32", "compile-fp32", "fused-fp32", "fused-bf16", "fused-auto",
                              "onnxruntime-fp32", "openvino-auto")),
            Problem("tiny", lr_size=16, scale=4, batches=(1,), steps=4, variants=("fused-fp32",),
                    tile=32, tile_overlap=8)),
}
# The training-step rows: (model, batch, HR crop side) of a demo-x4 training run on the CPU, of
# sr3-16-128 on a GPU.
TRAIN_PROBLEMS = {"cpu": ("demo-x4", 16, 64), "cuda": ("sr3-16-128", 16, 128)}


@dataclasses.dataclass(frozen=True)
class Variant:
    """One engine configuration: an engine backend, its dtype, the op backend of its
    GroupNorm+SiLU and posterior step, and its options. The id names the backend, the op backend
    when it is a kernel backend (neither `auto` nor `native`) and the dtype: a device's variants
    in VARIANTS differ in those, and the suite caches engines by it (`bench.interleaved
    --slice-bytes` labels its extra fused variants itself)."""

    backend: str
    dtype: torch.dtype | str
    options: tuple[tuple[str, object], ...] = ()
    op_backend: str = "auto"

    @property
    def id(self) -> str:
        ops_part = "" if self.op_backend in ("auto", "native") else f"-{self.op_backend}"
        return f"{self.backend}{ops_part}-{DTYPE_NAMES[self.dtype]}"

    def with_compile_mode(self, mode: str | None) -> "Variant":
        """This variant with torch.compile's `mode` replaced (`--compile-mode`; None: unchanged)."""
        if self.backend != "compile" or mode is None:
            return self
        options = tuple(option for option in self.options if option[0] != "mode")
        return dataclasses.replace(self, options=options + ((() if mode == "default" else (("mode", mode),))))

    @property
    def compile_mode(self) -> str | None:
        """torch.compile's mode for a compile variant (None for the others)."""
        return dict(self.options).get("mode", "default") if self.backend == "compile" else None


# "auto" is the engine's default: the precision `runtime.engine.choose_dtype` picks for the device
# and backend; its rows record what was picked and why.
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", AUTO: "auto"}
# What every speed-up is taken over. On CUDA it is plain PyTorch (`native` ops: `auto` would
# mean our Triton kernels there, understating every speed-up and tying the baseline to them);
# the eager run on the Triton ops is a row of its own. On the CPU the eager rows take `auto`
# (the C++ ops where the extension is built), as every earlier CPU run did.
BASELINE_BY_DEVICE = {"cuda": Variant("eager", torch.float32, op_backend="native"),
                      "cpu": Variant("eager", torch.float32)}
BASELINE_ID = BASELINE_BY_DEVICE["cpu"].id  # the same id on every device: "eager-fp32"
# onnxruntime runs fp16 on CUDA and fp32 on the CPU (no bf16 there, see its backend);
# torch.compile's strongest GPU setting is the baseline the fused backend must beat. On the CPU,
# fused-auto is the engine as a user gets it (dtype "auto": bf16 where the CPU computes it
# natively) and openvino-auto the peer people pick for CPU inference, at its best precision.
VARIANTS = {
    "cuda": (
        BASELINE_BY_DEVICE["cuda"], Variant("eager", torch.bfloat16, op_backend="native"),
        Variant("eager", torch.bfloat16, op_backend="triton"),
        Variant("compile", torch.bfloat16, (("mode", "max-autotune"), ("dynamic", False))),
        Variant("fused", torch.bfloat16, (("max_graphs", 16),)),
        Variant("onnxruntime", torch.float16),
        Variant("tensorrt", torch.bfloat16, (("min_shape", (1, 128, 128)), ("opt_shape", (16, 128, 128)),
                                            ("max_shape", (32, 128, 128)))),
    ),
    "cpu": (
        BASELINE_BY_DEVICE["cpu"], Variant("eager", torch.bfloat16),
        Variant("compile", torch.float32, (("dynamic", False),)),
        Variant("compile", torch.bfloat16, (("dynamic", False),)),
        Variant("fused", torch.float32), Variant("fused", torch.bfloat16), Variant("fused", AUTO),
        Variant("onnxruntime", torch.float32), Variant("openvino", AUTO), Variant("tensorrt", torch.bfloat16),
    ),
}


def load_model(name: str) -> tuple[sr3.SR3UNet, model_dir.ModelSpec | None]:
    """A seeded random-weight model of a named config (no spec), or a bundled model and its spec."""
    if name in sr3.NAMED_UNET_CONFIGS:
        torch.manual_seed(0)
        return sr3.SR3UNet(sr3.UNetConfig.named(name)), None
    return model_dir.load(name)


def build_engine(variant: Variant, problem: Problem, device: torch.device) -> sr3.SR3Engine:
    """The engine a benchmark runs: a seeded random-weight model of a named config (speed does
    not depend on the weights) or the bundled model with its schedule, the default ancestral
    plan, no progress bar."""
    model, spec = load_model(problem.config)
    schedule = sr3.NoiseSchedule.from_config(spec.schedule) if spec is not None else None
    resampler = spec.resampler if spec is not None else "bicubic"
    return sr3.SR3Engine(model, schedule, scale=problem.scale, backend=variant.backend, device=device,
                         dtype=variant.dtype, progress=False, resampler=resampler, op_backend=variant.op_backend,
                         backend_options=dict(variant.options))


def problem_named(device: torch.device, name: str | None) -> Problem:
    """The suite's problem on `device` whose model is `name` (None: the first); ValueError naming the choices."""
    problems = {problem.config: problem for problem in PROBLEMS[device.type]}
    problem = problems.get(name or PROBLEMS[device.type][0].config)
    if problem is None:
        raise ValueError(f"--problem {name!r}: the suite's problems on {device.type} are {list(problems)}")
    return problem


def variant_named(device: torch.device, name: str) -> Variant:
    for variant in VARIANTS[device.type]:
        if variant.id == name:
            return variant
    raise ValueError(f"no variant {name!r} on {device.type}; choose one of {[v.id for v in VARIANTS[device.type]]}")


def record(benchmark, device_info: DeviceInfo, **fields) -> None:
    """Put the device, versions and `fields` into the row's extra_info."""
    benchmark.extra_info.update(device_info.row())
    benchmark.extra_info.update(fields)


def median_seconds(benchmark) -> float | None:
    """The row's median in seconds; None under --benchmark-disable."""
    return benchmark.stats["median"] if benchmark.stats is not None else None
