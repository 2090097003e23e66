"""dtype="auto": bf16 where the device and the backend compute it natively, fp32 elsewhere.

The capability check (`runtime.engine.native_bf16`) is replaced to reach every device and
backend from this machine; the check itself is compared with the CPU's own flags.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import sr3_engine as sr3
from sr3_engine import metrics
from sr3_engine.cli import demo, evaluate, serve, upscale
from sr3_engine.io import load_image, pil_to_tensor
from sr3_engine.runtime import engine as engine_module
from sr3_engine.runtime.backends import ENGINE_BACKENDS
from sr3_engine.runtime.model_dir import ASSETS_DIR
from sr3_engine.serving.settings import ServeSettings

# Where each backend computes bf16 on a device that does; everywhere else auto is fp32.
COMPUTES_BF16 = {"eager": {"cpu", "cuda"}, "compile": {"cpu", "cuda"}, "fused": {"cpu", "cuda"},
                 "onnxruntime": set(), "tensorrt": {"cuda"}, "openvino": {"cpu"}}


def _native(monkeypatch, native: bool) -> None:
    monkeypatch.setattr(engine_module, "native_bf16", lambda device: native)


def test_every_backend_is_listed_here():
    assert set(ENGINE_BACKENDS) == set(COMPUTES_BF16)


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("backend", sorted(COMPUTES_BF16))
def test_auto_is_bf16_only_where_device_and_backend_compute_it(monkeypatch, backend, device, native):
    _native(monkeypatch, native)
    dtype, reason = engine_module.choose_dtype("auto", torch.device(device), backend)
    expected = torch.bfloat16 if native and device in COMPUTES_BF16[backend] else torch.float32
    assert dtype == expected
    assert reason.startswith("auto: ")
    if not native:
        assert "neither AVX-512 BF16 nor AMX" in reason if device == "cpu" else "predates sm_80" in reason
    elif expected == torch.float32:
        assert reason == f"auto: the {backend} backend does not compute bf16 on {device}"
    else:
        assert "computes bf16 natively" in reason


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_an_explicit_dtype_is_kept_whatever_the_machine(monkeypatch, tiny_model, dtype):
    _native(monkeypatch, dtype != torch.bfloat16)
    engine = sr3.SR3Engine(tiny_model, dtype=dtype, progress=False)
    assert (engine.dtype, engine.dtype_reason) == (dtype, "as asked")
    assert next(engine.model.parameters()).dtype == dtype


@pytest.mark.parametrize("native", [True, False])
def test_the_engine_defaults_to_auto(monkeypatch, tiny_model, native):
    _native(monkeypatch, native)
    engine = sr3.SR3Engine(tiny_model, progress=False)
    assert engine.dtype == (torch.bfloat16 if native else torch.float32)
    assert next(engine.model.parameters()).dtype == engine.dtype
    assert engine.dtype_reason.startswith("auto: ")


def test_other_spellings_are_refused(tiny_model):
    for dtype in ("bf16", "float32", torch.int8):
        with pytest.raises(ValueError, match="dtype must be 'auto' or one of"):
            sr3.SR3Engine(tiny_model, dtype=dtype, progress=False)


def _proc_cpuinfo_flags() -> set[str]:
    text = Path("/proc/cpuinfo").read_text()
    return set(re.search(r"^flags\s*:(.*)$", text, flags=re.MULTILINE)[1].split())


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="reads the flags of Linux's /proc/cpuinfo")
def test_the_cpu_check_agrees_with_the_kernels_flags(monkeypatch):
    expected = bool(_proc_cpuinfo_flags() & {"avx512_bf16", "amx_bf16"})
    assert engine_module.native_bf16(torch.device("cpu")) == expected
    # A torch without get_capabilities reads /proc/cpuinfo itself.
    monkeypatch.delattr(torch.cpu, "get_capabilities", raising=False)
    monkeypatch.setattr(engine_module, "cpu_flags", engine_module.cpu_flags.__wrapped__)
    assert engine_module.cpu_flags() == frozenset(_proc_cpuinfo_flags())
    assert engine_module.native_bf16(torch.device("cpu")) == expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_without_cuda_the_cuda_check_answers_no_rather_than_failing():
    assert engine_module.native_bf16(torch.device("cuda")) is False


def test_commands_and_settings_default_to_auto():
    assert upscale.build_parser().parse_args(["x.png", "-o", "out", "--model", "m"]).dtype == "auto"
    assert evaluate.parse_args(["--model", "m", "--data", ".", "--scale", "4"]).dtype == "auto"
    assert serve.build_parser().parse_args(["--model", "m"]).dtype == "auto"
    assert ServeSettings(model="m").dtype == "auto"
    for name in engine_module.PRECISION_CHOICES:
        assert engine_module.engine_dtype(name) == (engine_module.PRECISIONS.get(name) or "auto")


def test_the_demo_command_says_what_auto_chose(monkeypatch, tmp_path, capsys):
    _native(monkeypatch, False)
    assert demo.main(["--out", str(tmp_path), "--backend", "eager", "--steps", "1"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.endswith("eager backend, fp32; auto: this CPU has neither AVX-512 BF16 nor AMX, so bf16 would be "
                          "emulated)")


def test_bf16_chosen_by_auto_stays_close_to_fp32(monkeypatch):
    """demo-x4's output when auto takes bf16 (forced here) against fp32 eager, on a 16x16 crop of the
    bundled photo at the model's default sampler: within 2/255 everywhere and 50 dB PSNR (measured:
    0.0022 and 59.7 dB on a 32x32 crop)."""
    lr = pil_to_tensor(load_image(ASSETS_DIR / "photos" / "chelsea-lr.png"))[None][..., 24:40, 24:40]
    reference = sr3.SR3Engine.from_pretrained("demo-x4", dtype=torch.float32, progress=False).sample(
        lr, generator=torch.Generator().manual_seed(0))
    _native(monkeypatch, True)
    engine = sr3.SR3Engine.from_pretrained("demo-x4", backend="fused", progress=False)
    assert engine.dtype == torch.bfloat16
    output = engine.sample(lr, generator=torch.Generator().manual_seed(0))
    assert float((output - reference).abs().max()) <= 2 / 255
    assert float(metrics.psnr(output, reference)) >= 50.0
