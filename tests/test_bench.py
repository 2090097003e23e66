"""The benchmark suite's own code: FLOP counts, device peaks, the report. Timings are never
asserted; the one run of bench/ here has timing disabled and only checks that it still runs."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from xml.etree import ElementTree

import pytest
import torch
import torch.nn as nn
from PIL import Image

import sr3_engine as sr3
from bench import harness, interleaved, report

ROOT = Path(__file__).resolve().parents[1]


def _hand_counted_flops(config_name: str, size: int) -> int:
    """2 * MACs of every convolution, linear and attention matmul, from shapes seen by hooks."""
    model = sr3.SR3UNet(sr3.UNetConfig.named(config_name)).eval()
    total = 0

    def conv_hook(module, inputs, output):
        nonlocal total
        kh, kw = module.kernel_size
        total += 2 * output.numel() * (module.in_channels // module.groups) * kh * kw

    def linear_hook(module, inputs, output):
        nonlocal total
        total += 2 * output.numel() * module.in_features

    def attention_hook(module, inputs, output):
        nonlocal total
        b, c, h, w = inputs[0].shape
        total += 2 * 2 * b * (h * w) ** 2 * c  # q k^T, then the weights times v

    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            module.register_forward_hook(conv_hook)
        elif isinstance(module, nn.Linear):
            module.register_forward_hook(linear_hook)
        elif isinstance(module, sr3.unet.SelfAttention):
            module.register_forward_hook(attention_hook)
    image = torch.zeros(1, 3, size, size)
    with torch.no_grad():
        model(image, image, torch.zeros(1))
    return total


@pytest.mark.parametrize("config_name, size", [("tiny", 32), ("tiny", 64)])
def test_flops_per_image_match_a_hand_count(config_name, size):
    assert harness.flops_per_image(config_name, size, size) == _hand_counted_flops(config_name, size)


def test_sr3_16_128_costs_the_92_gflop_per_step_of_the_design():
    assert harness.flops_per_image("sr3-16-128", 128, 128) / 1e9 == pytest.approx(92.35, abs=0.01)


@pytest.mark.parametrize("name, tflops, fp32_tflops, tbps", [
    ("NVIDIA H100 80GB HBM3", 989.4, 67.0, 3.35), ("NVIDIA H100 PCIe", 756.5, 51.0, 2.0),
    ("NVIDIA H100 NVL", 835.5, 60.0, 3.9), ("NVIDIA H200", 989.4, 67.0, 4.8), ("NVIDIA A100-SXM4-80GB", 312.0, 19.5, 2.039),
])
def test_gpu_peaks_come_from_the_data_sheet(name, tflops, fp32_tflops, tbps):
    flops, fp32_flops, bandwidth, source = harness.data_sheet(name, tf32=False)
    assert (flops, fp32_flops, bandwidth) == (tflops * 1e12, fp32_tflops * 1e12, tbps * 1e12)
    assert "CUDA cores" in source
    # Where cuDNN may use TF32 for fp32 convolutions, the fp32 peak is TF32's: half of bf16's.
    assert harness.data_sheet(name, tf32=True)[1] == tflops * 1e12 / 2


def _device_info(device: str, native_bf16: bool) -> harness.DeviceInfo:
    return harness.DeviceInfo(device, "a device", 100e12, 1e12, "given", {}, 10e12, native_bf16)


@pytest.mark.parametrize("device, native, dtype, peak, precision", [
    ("cpu", False, torch.float32, 10e12, "fp32"),
    ("cpu", False, torch.bfloat16, 10e12, "fp32 (bf16 is emulated in fp32 here)"),
    ("cpu", True, torch.bfloat16, 100e12, "bf16"),
    ("cpu", True, torch.float16, 10e12, "fp32 (fp16 is emulated in fp32 here)"),
    ("cuda", True, torch.float16, 100e12, "bf16"),
    ("cuda", True, torch.float32, 10e12, "fp32"),
])
def test_a_rows_roofline_is_the_peak_of_the_precision_the_device_computes_it_in(device, native, dtype, peak,
                                                                                 precision):
    assert _device_info(device, native).peak_flops(dtype) == (peak, precision)


def test_an_unknown_device_has_no_data_sheet_and_is_measured():
    for name in ("Some Future GPU", "NVIDIA GH200 480GB", "NVIDIA H100 80GB HBM3 MIG 1g.10gb"):
        assert harness.data_sheet(name) is None, name
    info = harness.describe(torch.device("cpu"))
    assert info.peak_bf16_flops > 0 and info.peak_fp32_flops > 0 and info.peak_bytes_per_s > 0
    assert "measured" in info.peak_source and "fp32 matmul" in info.peak_source
    row = info.row()
    assert row["torch"] == torch.__version__ and row["device"] == "cpu"


def test_given_peaks_replace_the_measured_ones():
    info = harness.describe(torch.device("cpu"), peak_tflops=2.0, peak_gbps=50.0, peak_fp32_tflops=0.5)
    assert (info.peak_bf16_flops, info.peak_fp32_flops, info.peak_bytes_per_s) == (2.0e12, 0.5e12, 50.0e9)
    assert all(given in info.peak_source for given in ("--peak-tflops 2.0", "--peak-gbps 50.0",
                                                        "--peak-fp32-tflops 0.5"))
    assert "measured here" not in info.peak_source


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_the_peaks_are_measured_on_the_largest_matmul_the_budget_allows(dtype):
    flops, side = harness.measure_flops(torch.device("cpu"), dtype, size=512, repeats=1, budget_s=0.0)
    assert side == 256 and flops > 0  # no budget: the first side only
    flops, side = harness.measure_flops(torch.device("cpu"), dtype, size=512, repeats=1, budget_s=1e9)
    assert side == 512 and flops > 0  # never beyond `size`


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_cuda_clock_waits_for_the_work_it_times():
    device = torch.device("cuda")
    clock = harness.CudaSyncClock(device)
    a = torch.randn(4096, 4096, device=device)
    start = clock()
    for _ in range(20):
        a = a @ a.T / 4096  # queued asynchronously: only a clock that synchronises sees their time
    queued = time.perf_counter()
    elapsed = clock() - start
    torch.cuda.synchronize(device)
    expected = 20 * 2 * 4096**3 / harness.measure_flops(device, torch.bfloat16, 4096)[0] / 4  # fp32 runs at most ~4x slower
    assert elapsed > queued - start and elapsed > expected / 10


# --- the report, on a run whose numbers are known -------------------------------------------------

DEVICE = {"device": "cuda", "device_name": "NVIDIA H100 80GB HBM3", "peak_bf16_tflops": 989.4, "peak_gbps": 3350.0,
          "peak_source": "NVIDIA H100 SXM5 data sheet", "python": "3.12.3", "torch": "2.11.0", "triton": "3.6.0",
          "cuda": "13.0", "onnxruntime": "1.22.0", "sr3_engine": "0.1.0", "torch_threads": 16,
          "cudnn_allow_tf32": True, "matmul_allow_tf32": False}
# Seconds per 100-step sample at batch 1, 16, 32.
SAMPLE_SECONDS = {"eager-fp32": (10.0, 40.0, 80.0), "compile-bf16": (3.0, 12.0, 20.0), "fused-bf16": (2.0, 10.0, 16.0)}
FLOPS_PER_IMAGE = 92e9


def _bench(name, group, median, **extra):
    return {"name": name, "group": group, "stats": {"median": median, "iqr": median / 10},
            "extra_info": {**DEVICE, **extra}}


def _document(date="2026-11-24T10:00:00", skipped=()):
    benchmarks = []
    for variant, seconds in SAMPLE_SECONDS.items():
        backend, dtype = variant.split("-")
        for batch, median in zip((1, 16, 32), seconds):
            flops = batch * FLOPS_PER_IMAGE
            fields = dict(variant=variant, backend=backend, dtype=dtype, batch=batch, steps=100, config="sr3-16-128",
                          height=128, width=128, flops_per_step=flops)
            benchmarks.append(_bench(f"test_sample[{variant}-batch{batch}]", "sample", median, kind="sample",
                                     images_per_s=batch / median, ms_per_step=median * 10,
                                     roofline_fraction=flops * 100 / median / 989.4e12, **fields))
            benchmarks.append(_bench(f"test_step[{variant}-batch{batch}]", "step", median / 100, kind="step",
                                     **fields))
    for backend, median in (("native", 4e-4), ("triton", 1e-4)):
        benchmarks.append(_bench(f"test_group_norm_silu[{backend}]", "gn", median, kind="op", op="group_norm_silu",
                                 case="group_norm_silu 16x64x128x128", backend=backend, bytes=33554432,
                                 gbps=33554432 / median / 1e9, bandwidth_fraction=33554432 / median / 3.35e12))
    return {"datetime": date, "benchmarks": benchmarks, "sr3_command": "python -m pytest bench/ --benchmark-json gpu.json",
            "sr3_skipped": list(skipped)}


@pytest.fixture
def results(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text(f"# Results\n\nhand-written text\n\n{report.INSERT_MARKER}\n\n## Earlier\n\nkept\n")
    return path


def _write(tmp_path, document, name="bench.json"):
    path = tmp_path / name
    path.write_text(json.dumps(document))
    return path


def _run_section(text, key):
    start = text.index(f"<!-- bench-run: {key} -->")
    return text[start:text.index("<!-- /bench-run -->", start)]


def test_report_tables_hold_the_runs_ratios(tmp_path, results):
    skipped = [{"test": "test_sample", "case": f"tensorrt-bf16-batch{b}", "backend": "tensorrt-bf16",
                "reason": "tensorrt is not installed"} for b in (1, 8, 16, 32)]
    assert report.main([str(_write(tmp_path, _document(skipped=skipped))), "--results", str(results)]) == 0
    text = results.read_text()
    section = _run_section(text, "NVIDIA H100 80GB HBM3 | 2026-11-24")
    assert "hand-written text" in text and "kept" in text
    assert "| fused-bf16 vs eager-fp32, batch 1 | >= 4x | 5.00x |" in section
    assert "| fused-bf16 vs eager-fp32, batch 16 | >= 2.5x | 4.00x |" in section
    assert "| fused-bf16 vs the faster compile variant, batch 32 | >= 1.25x | 1.25x |" in section
    roofline = 32 * FLOPS_PER_IMAGE * 100 / 16.0 / 989.4e12
    assert f"| fused-bf16 roofline fraction, batch 32 | >= 50% | {100 * roofline:.1f}% |" in section
    assert "| fused-bf16 | 0.50 ±5% | 1.60 ±5% | 2.00 ±5% |" in section  # images/s, half the IQR
    assert "| compile-bf16 | 3.33x | 3.33x | 4.00x |" in section  # speed-up over eager fp32
    assert "| group_norm_silu 16x64x128x128 | 400, 83.9 (2.5%) | 100, 336 (10.0%) | 4.00x |" in section
    assert "- `test_sample` tensorrt-bf16 (4 cases): tensorrt is not installed" in section
    assert "    python -m pytest bench/ --benchmark-json gpu.json" in section
    assert "convolutions run in TF32 and matmuls in full fp32" in section
    chart = results.parent / "RESULTS-cuda-nvidia-h100-80gb-hbm3-2026-11-24.png"
    assert f"]({chart.name})" in section
    with Image.open(chart) as image:
        assert image.format == "PNG" and image.width > 500


def test_each_problem_gets_its_tables_and_training_steps_their_own(tmp_path, results):
    document = _document()
    # A second problem measured in the same run: its rows must not mix with the first one's.
    for batch, (eager, fused) in zip((1, 4), ((8.0, 2.0), (30.0, 6.0))):
        for variant, median in (("eager-fp32", eager), ("fused-fp32", fused)):
            fields = dict(variant=variant, backend=variant.split("-")[0], dtype="fp32", batch=batch, steps=4,
                          config="demo-x4", height=256, width=256, flops_per_step=batch * 1e9)
            document["benchmarks"].append(_bench(f"test_sample[demo-x4-{variant}-batch{batch}]", "sample", median,
                                                 kind="sample", images_per_s=batch / median, roofline_fraction=0.1,
                                                 ms_per_step=median * 250, **fields))
    for backend, median in (("native", 2.0), ("cpp", 1.6)):
        document["benchmarks"].append(_bench(f"test_train_step[{backend}]", "train", median, kind="train",
                                             op_backend=backend, config="demo-x4", batch=16, height=64, width=64,
                                             images_per_s=16 / median))
    assert report.main([str(_write(tmp_path, document)), "--results", str(results)]) == 0
    section = _run_section(results.read_text(), "NVIDIA H100 80GB HBM3 | 2026-11-24")
    assert "#### End to end: `engine.sample`, sr3-16-128 at 128x128, 100 steps" in section
    demo = section[section.index("#### End to end: `engine.sample`, demo-x4 at 256x256, 4 steps"):]
    assert "| fused-fp32 | 4.00x | 5.00x |" in demo and "batch 16" not in demo.split("####")[1]
    assert "| fused-bf16 vs eager-fp32, batch 1 | >= 4x | 5.00x |" in section  # goals: the first problem's
    assert "| cpp | 1.60 | 10.0 | 1.25x |" in section


def test_a_rerun_replaces_its_section_and_keeps_earlier_dates(tmp_path, results):
    report.main([str(_write(tmp_path, _document("2026-11-20T09:00:00"))), "--results", str(results)])
    report.main([str(_write(tmp_path, _document("2026-11-24T09:00:00"))), "--results", str(results)])
    report.main([str(_write(tmp_path, _document("2026-11-24T18:00:00"))), "--results", str(results),
                 "--command", "make bench-gpu"])
    text = results.read_text()
    assert text.count("<!-- bench-run: NVIDIA H100 80GB HBM3 | 2026-11-24 -->") == 1
    assert text.index("| 2026-11-24 -->") < text.index("| 2026-11-20 -->") < text.index("## Earlier")
    assert "    make bench-gpu" in _run_section(text, "NVIDIA H100 80GB HBM3 | 2026-11-24")


def test_parts_of_one_run_are_merged(tmp_path, results):
    document = _document()
    ops = {**document, "benchmarks": [b for b in document["benchmarks"] if b["extra_info"]["kind"] == "op"],
           "sr3_command": "pytest bench/test_ops.py"}
    rest = {**document, "benchmarks": [b for b in document["benchmarks"] if b["extra_info"]["kind"] != "op"]}
    paths = [str(_write(tmp_path, ops, "ops.json")), str(_write(tmp_path, rest, "rest.json"))]
    assert report.main([*paths, "--results", str(results)]) == 0
    section = _run_section(results.read_text(), "NVIDIA H100 80GB HBM3 | 2026-11-24")
    assert "#### Per op" in section and "#### End to end" in section
    assert "pytest bench/test_ops.py; python -m pytest bench/ --benchmark-json gpu.json" in section
    assert "Medians of 2 runs on this machine" in section


def test_report_errors_name_the_file_and_write_nothing(tmp_path, results, capsys):
    before = results.read_text()
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    assert report.main([str(broken), "--results", str(results)]) == 1
    assert str(broken) in capsys.readouterr().err
    foreign = _write(tmp_path, {"benchmarks": [{"name": "x", "stats": {"median": 1.0}, "extra_info": {}}]})
    assert report.main([str(foreign), "--results", str(results)]) == 1
    assert "was not written by bench/" in capsys.readouterr().err
    no_marker = tmp_path / "NO_MARKER.md"
    no_marker.write_text("# nothing to insert after\n")
    assert report.main([str(_write(tmp_path, _document())), "--results", str(no_marker)]) == 1
    assert str(no_marker) in capsys.readouterr().err
    assert results.read_text() == before
    assert not list(tmp_path.glob("*.png"))


def test_the_benchmark_suite_still_runs(tmp_path):
    # Timing disabled: every kind of row runs once on the CPU, which catches a broken suite early.
    rows = {"test_ops": ["test_group_norm_silu[1x512x8x8-nchw-fp32-native]",
                         "test_posterior_step[1x3x128x128-seeded-cpp]"],
            "test_sample": ["test_sample[eager-fp32-batch1]", "test_sample[fused-fp32-batch1]",
                            "test_step[eager-fp32-batch1]", "test_step[fused-fp32-batch1]",
                            "test_sample[demo-x4-fused-fp32-batch1]", "test_sample[tiny-64px-tile32-fused-fp32-batch1]"],
            "test_train": ["test_train_step[cpp]"]}
    report_xml = tmp_path / "bench.xml"
    env = {**os.environ, "TRITON_INTERPRET": "0"}  # as make bench runs it, not as make test runs the tests
    # Peaks given, since nothing is timed: measuring them is a minute-long bf16 matmul on some CPUs.
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--device", "cpu",
                             "--benchmark-disable", "--peak-tflops", "1", "--peak-gbps", "10",
                             "--junitxml", str(report_xml),
                             *(f"bench/{module}.py::{row}" for module, names in rows.items() for row in names)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    rows = [row for names in rows.values() for row in names]
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # A row passed when its <testcase> holds no <skipped>, <failure> or <error>.
    outcome = {case.get("name"): [child.tag for child in case]
               for case in ElementTree.parse(report_xml).getroot().iter("testcase")}
    assert {row: outcome.get(row) for row in rows} == {row: [] for row in rows}


class _FakeCudaMemory:
    """PyTorch's allocator counters around a backend whose graphs hold `pool` bytes once captured
    and whose calls allocate `transient` bytes on top of what is live; other engines' graphs and
    this one's graphs of an earlier shape hold memory too."""

    def __init__(self, pool: int, transient: int):
        self.pool, self.transient = pool, transient
        self.others, self.own = 500, 250
        self.allocated, self.peak, self.cached = 1000, 1000, 0

    def run(self, graphs: bool) -> None:
        if graphs and self.own == 0:
            self.own = self.pool  # a capture
        self.peak = max(self.peak, self.allocated + self.transient)
        self.cached = self.transient  # freed, kept by the allocator until empty_cache

    def install(self, monkeypatch) -> None:
        cuda = torch.cuda
        monkeypatch.setattr(cuda, "synchronize", lambda device=None: None)
        monkeypatch.setattr(cuda, "empty_cache", lambda: setattr(self, "cached", 0))
        monkeypatch.setattr(cuda, "memory_reserved",
                            lambda device=None: self.allocated + self.others + self.own + self.cached)
        monkeypatch.setattr(cuda, "memory_allocated", lambda device=None: self.allocated)
        monkeypatch.setattr(cuda, "max_memory_allocated", lambda device=None: self.peak)
        monkeypatch.setattr(cuda, "reset_peak_memory_stats", lambda device=None: setattr(self, "peak", self.allocated))


@pytest.mark.parametrize("graphs", [True, False], ids=["graph-backend", "eager-backend"])
def test_a_calls_memory_is_its_weights_graph_pool_and_own_allocations(monkeypatch, graphs):
    fake = _FakeCudaMemory(pool=300, transient=40)
    fake.install(monkeypatch)
    model = nn.Linear(4, 4)  # stands in for the engine's module; on the CPU, so it holds no device memory
    calls = []
    backend = type("Backend", (), {})()
    if graphs:
        backend.release_graphs = lambda: setattr(fake, "own", 0)
    engine = type("Engine", (), {"backend": backend, "model": model})()
    memory = harness.call_memory(engine, lambda: calls.append(fake.run(graphs)), torch.device("cuda"))
    expected_pool = 300 if graphs else 0
    assert memory == {"weight_bytes": 0, "graph_pool_bytes": expected_pool, "transient_peak_bytes": 40,
                      "peak_memory_bytes": expected_pool + 40}
    assert len(calls) == (2 if graphs else 1)


def test_interleaved_rounds_alternate_and_time_each_variant_alone():
    order = []

    class Engine:
        def __init__(self, name, seconds):
            self.name, self.seconds = name, seconds

        def sample(self, lr, *, generator, steps):
            order.append(self.name)
            now[0] += self.seconds * steps

    now = [0.0]
    engines = {"a": Engine("a", 0.5), "b": Engine("b", 0.25)}
    seconds = interleaved.interleaved_seconds(engines, torch.zeros(1, 3, 2, 2), steps=4, rounds=3,
                                              clock=lambda: now[0])
    assert order == ["a", "b"] + ["a", "b"] * 3  # one warm-up each, untimed, then alternating rounds
    assert seconds == {"a": [2.0] * 3, "b": [1.0] * 3}
    lines = interleaved.table(seconds, steps=4)
    assert lines[2] == "| a | 500 | 0.50x | 500, 500, 500 |"
    assert lines[3] == "| b | 250 | 2.00x | 250, 250, 250 |"


def test_interleaved_refuses_an_unknown_variant_or_problem_naming_it(capsys):
    with pytest.raises(SystemExit):
        interleaved.main(["--device", "cpu", "--variants", "fused-fp8"])
    assert "no variant 'fused-fp8' on cpu" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        interleaved.main(["--device", "cpu", "--problem", "sr3-16-128"])
    assert "--problem 'sr3-16-128': the suite's problems on cpu are ['tiny', 'demo-x4']" in capsys.readouterr().err


def test_interleaved_times_fused_at_each_slice_bytes_asked_for(monkeypatch, capsys):
    built = {}

    def build_engine(variant, problem, device):
        options = dict(variant.options)
        built[variant.id, options.get("slice_bytes", "default")] = problem.config
        return object()

    monkeypatch.setattr(interleaved, "build_engine", build_engine)
    monkeypatch.setattr(interleaved, "interleaved_seconds",
                        lambda engines, lr, steps, rounds, clock: {name: [1.0] for name in engines})
    assert interleaved.main(["--device", "cpu", "--problem", "demo-x4", "--batch", "4", "--variants", "eager-fp32",
                             "--slice-bytes", "1048576", "none", "--rounds", "1"]) == 0
    assert built == {("eager-fp32", "default"): "demo-x4", ("fused-fp32", 1048576): "demo-x4",
                     ("fused-fp32", None): "demo-x4"}
    output = capsys.readouterr().out
    assert "| fused-fp32 slice_bytes=1048576 |" in output and "| fused-fp32 slice_bytes=None |" in output
    # CUDA has no fused-fp32 variant: the option is refused there, and without it nothing looks for one.
    class EnginesBuilt(Exception):
        pass

    def build_and_stop(variant, problem, device):
        raise EnginesBuilt(variant.id)

    monkeypatch.setattr(interleaved, "resolve_device", lambda name: torch.device("cuda"))
    monkeypatch.setattr(interleaved, "build_engine", build_and_stop)
    with pytest.raises(EnginesBuilt, match="fused-bf16"):
        interleaved.main(["--variants", "fused-bf16", "--rounds", "1"])
    with pytest.raises(SystemExit):
        interleaved.main(["--variants", "fused-bf16", "--slice-bytes", "1048576"])
    assert "--slice-bytes tunes the fused backend on the CPU; the device is cuda" in capsys.readouterr().err
    for bad in ("0", "4MiB", "-1"):
        with pytest.raises(SystemExit):
            interleaved.main(["--device", "cpu", "--slice-bytes", bad])
        assert "expected a positive number of bytes or none" in capsys.readouterr().err


def test_speed_ups_use_the_paired_baseline_rounds(tmp_path, results):
    # Each backend's rounds ran right after baseline rounds that took 8x as long: the machine was
    # slower then than when the baseline's own row was measured, and only the pairing shows it.
    document = _document()
    for bench in document["benchmarks"]:
        info = bench["extra_info"]
        if info["kind"] == "sample" and info["variant"] != "eager-fp32":
            info["paired_baseline_seconds"] = 8 * bench["stats"]["median"]
    assert report.main([str(_write(tmp_path, document)), "--results", str(results)]) == 0
    section = _run_section(results.read_text(), "NVIDIA H100 80GB HBM3 | 2026-11-24")
    assert "| fused-bf16 vs eager-fp32, batch 1 | >= 4x | 8.00x |" in section
    assert "| compile-bf16 | 8.00x | 8.00x | 8.00x |" in section
    assert "| fused-bf16 vs the faster compile variant, batch 32 | >= 1.25x | 1.00x |" in section


def test_a_part_without_baseline_rows_keeps_its_paired_speed_ups(tmp_path, results):
    # One compile batch run on its own, as the GPU procedure does, still carries its pairing.
    document = _document()
    document["benchmarks"] = [b for b in document["benchmarks"] if b["extra_info"].get("variant") == "fused-bf16"
                              and b["extra_info"]["kind"] == "sample"]
    for bench in document["benchmarks"]:
        bench["extra_info"]["paired_baseline_seconds"] = 3 * bench["stats"]["median"]
    assert report.main([str(_write(tmp_path, document)), "--results", str(results)]) == 0
    section = _run_section(results.read_text(), "NVIDIA H100 80GB HBM3 | 2026-11-24")
    assert "| fused-bf16 | 3.00x | 3.00x | 3.00x |" in section
    assert "| fused-bf16 vs eager-fp32, batch 1 | >= 4x | 3.00x |" in section
    assert "| fused-bf16 vs the faster compile variant, batch 1 | >= 1.25x | not in this run |" in section


def test_parts_merge_in_measured_order_and_refuse_overlaps(tmp_path, results, capsys):
    document = _document()
    early = {**document, "datetime": "2026-11-24T08:00:00", "sr3_command": "python -m pytest bench -k op",
             "benchmarks": [b for b in document["benchmarks"] if b["extra_info"]["kind"] == "op"],
             "sr3_skipped": [{"test": "test_sample", "case": "fused-bf16-batch1", "backend": "fused-bf16",
                              "reason": "measured in the later part"}]}
    late = {**document, "datetime": "2026-11-24T09:00:00", "sr3_command": "python -m pytest bench -k sample",
            "benchmarks": [b for b in document["benchmarks"] if b["extra_info"]["kind"] != "op"]}
    paths = [str(_write(tmp_path, late, "late.json")), str(_write(tmp_path, early, "early.json"))]
    assert report.main([*paths, "--results", str(results)]) == 0
    section = _run_section(results.read_text(), "NVIDIA H100 80GB HBM3 | 2026-11-24")
    assert "python -m pytest bench -k op; python -m pytest bench -k sample" in section
    assert "measured in the later part" not in section
    overlapping = _write(tmp_path, _document(), "overlap.json")
    assert report.main([paths[0], str(overlapping), "--results", str(results)]) == 1
    assert "was measured in" in capsys.readouterr().err


def test_op_speed_ups_need_native_and_say_so(tmp_path, results):
    document = _document()
    document["benchmarks"] = [b for b in document["benchmarks"]
                              if b["extra_info"]["kind"] == "op" and b["extra_info"]["backend"] != "native"]
    assert report.main([str(_write(tmp_path, document)), "--results", str(results)]) == 0
    section = _run_section(results.read_text(), "NVIDIA H100 80GB HBM3 | 2026-11-24")
    assert "| group_norm_silu 16x64x128x128 | 100, 336 (10.0%) | - |" in section
    assert "#### End to end" not in section and "![" not in section


def test_rows_missing_what_the_tables_need_are_refused_naming_the_file(tmp_path, results, capsys):
    document = _document()
    del document["benchmarks"][0]["extra_info"]["images_per_s"]
    path = _write(tmp_path, document)
    assert report.main([str(path), "--results", str(results)]) == 1
    assert f"{path}: benchmark 'test_sample[eager-fp32-batch1]' lacks images_per_s" in capsys.readouterr().err


def test_a_roofline_fraction_above_the_peak_is_printed_as_an_error_and_the_peak_is_named(tmp_path, results):
    document = _document()
    for bench in document["benchmarks"]:
        info = bench["extra_info"]
        if info["kind"] == "sample":
            info.update(roofline_precision="bf16", roofline_peak_tflops=989.4)
            if info["variant"] == "fused-bf16" and info["batch"] == 32:
                info["roofline_fraction"] = 6.92
    assert report.main([str(_write(tmp_path, document)), "--results", str(results)]) == 0
    section = _run_section(results.read_text(), "NVIDIA H100 80GB HBM3 | 2026-11-24")
    assert "| fused-bf16 roofline fraction, batch 32 | >= 50% | error: above the peak |" in section
    assert "692" not in section
    assert "of the peak each row computes in: eager-fp32: bf16 989 TFLOP/s" in section
