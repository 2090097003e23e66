"""The HTTP service (`python -m sr3_engine serve`), started for real as a process and called over
HTTP: results, every refusal as a one-line JSON error, metrics, an API key, no leak under a
thousand bad requests, and a SIGTERM that answers what was accepted, then exits 0."""

import concurrent.futures
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sr3_engine as sr3

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    torch.manual_seed(1234)
    model = sr3.SR3UNet(sr3.UNetConfig.named("tiny")).eval()
    engine = sr3.SR3Engine(model, schedule=sr3.NoiseSchedule.linear(6, 1e-3, 0.2), scale=2,
                           sampler=sr3.SamplerConfig("ddim"), progress=False)
    return engine.save_pretrained(tmp_path_factory.mktemp("model") / "tiny")


class Server:
    """`python -m sr3_engine serve` on a free port, ready, with its process at hand."""

    def __init__(self, model: Path, *flags: str, env: dict | None = None):
        command = [sys.executable, "-m", "sr3_engine", "serve", "--model", str(model), "--port", "0",
                   "--backend", "eager", "--device", "cpu", "--tile-sides", "24,48", "--log-level", "warning", *flags]
        self.process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                        env={**os.environ, **(env or {})})
        first = self.process.stdout.readline()
        match = re.search(r"on (http://\S+) ", first)
        assert match, f"no address in {first!r}; stderr: {self.process.stderr.read() if not match else ''}"
        self.first_line, self.url = first, match[1]
        deadline = time.monotonic() + 60
        while get(self.url + "/readyz")[0] != 200:
            assert time.monotonic() < deadline, "not ready within 60 s"
            time.sleep(0.1)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(60)
        self.process.stdout.close()
        self.process.stderr.close()
        return code


def request(url: str, data: bytes | None = None, headers: dict | None = None, method: str | None = None,
            timeout: float = 60) -> tuple[int, dict, bytes]:
    call = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(call, timeout=timeout) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, {k.lower(): v for k, v in error.headers.items()}, error.read()


def get(url: str) -> tuple[int, dict, bytes]:
    try:
        return request(url)
    except (urllib.error.URLError, ConnectionError):
        return 0, {}, b""


def png(size=(12, 10), mode="RGB", seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    channels = len(mode)
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8).squeeze(), mode=mode)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def flat_png(size) -> bytes:
    """A PNG of many pixels in few bytes."""
    buffer = io.BytesIO()
    Image.new("RGB", size, (90, 120, 40)).save(buffer, format="PNG")
    return buffer.getvalue()


def upscale(url: str, body: bytes, query: str = "", content_type: str = "image/png", **kwargs):
    return request(f"{url}/v1/upscale{'?' + query if query else ''}", data=body,
                   headers={"Content-Type": content_type, **kwargs.pop("headers", {})}, **kwargs)


@pytest.fixture(scope="module")
def server(tiny_dir):
    running = Server(tiny_dir, "--max-upload", "64K", "--max-pixels", "40000", "--upload-timeout", "1")
    yield running
    assert running.stop() == 0


def test_the_first_line_says_where_and_what(server, tiny_dir):
    assert server.first_line.startswith(f"serving {tiny_dir} on http://127.0.0.1:")
    assert "backend eager on cpu, fp32" in server.first_line


def test_an_upscaled_png_comes_back_as_engine_sample_draws_it(server, tiny_dir):
    body = png((12, 12))  # one tile of 24: what the engine samples whole
    status, headers, data = upscale(server.url, body, "seed=5&sampler=ancestral")
    assert status == 200 and headers["content-type"] == "image/png" and headers["x-seed"] == "5"
    out = np.asarray(Image.open(io.BytesIO(data)))
    engine = sr3.SR3Engine.from_pretrained(tiny_dir, progress=False)
    lr = sr3.io.pil_to_tensor(Image.open(io.BytesIO(body)))
    expected = engine.sample(lr[None], generator=torch.Generator().manual_seed(5), sampler="ancestral")[0]
    expected = np.asarray(sr3.io.tensor_to_pil(expected))
    assert out.shape == (24, 24, 3)
    assert np.abs(out.astype(int) - expected.astype(int)).max() <= 1
    # The same seed gives the same bytes; no seed gives a random one, reported.
    assert upscale(server.url, body, "seed=5&sampler=ancestral")[2] == data
    status, headers, _ = upscale(server.url, body, "sampler=ancestral")
    assert status == 200 and int(headers["x-seed"]) >= 0


def test_alpha_and_outscale_follow_the_upscale_command(server):
    status, _, data = upscale(server.url, png((10, 8), "RGBA"), "outscale=1.5&seed=0")
    out = Image.open(io.BytesIO(data))
    assert status == 200 and out.mode == "RGBA" and out.size == (15, 12)


@pytest.mark.parametrize("case, status, match", [
    ("too many bytes", 413, "limit is 65536"),
    ("too many pixels", 413, "decompression-bomb guard"),
    ("not an image", 415, "not a PNG, JPEG, WebP, TIFF or BMP image"),
    ("text content type", 415, "is not an image"),
    ("truncated png", 400, "corrupt or truncated|corrupt PNG"),
    ("empty body", 400, "empty data"),
    ("steps 0", 422, "steps: Input should be greater than or equal to 1"),
    ("steps over the schedule", 422, "steps must be in \\[1, 6\\] for this model's schedule; got 7"),
    ("unknown sampler", 422, "sampler"),
    ("strength 2", 422, "strength"),
    ("negative seed", 422, "seed"),
    ("outscale 0", 422, "outscale"),
    ("outscale over the scale", 422, "outscale: must be at most the model's scale 2"),
    ("deadline passed", 504, "deadline"),
    ("unknown route", 404, "Not Found"),
    ("wrong method", 405, "Method Not Allowed"),
])
def test_every_refusal_is_a_one_line_json_error(server, case, status, match):
    good = png()
    calls = {
        "too many bytes": lambda: upscale(server.url, b"\x89PNG" + bytes(70_000)),
        "too many pixels": lambda: upscale(server.url, flat_png((250, 200))),
        "not an image": lambda: upscale(server.url, b"hello, this is text", content_type="application/octet-stream"),
        "text content type": lambda: upscale(server.url, good, content_type="text/plain"),
        "truncated png": lambda: upscale(server.url, good[:60]),
        "empty body": lambda: upscale(server.url, b""),
        "steps 0": lambda: upscale(server.url, good, "steps=0"),
        "steps over the schedule": lambda: upscale(server.url, good, "steps=7"),
        "unknown sampler": lambda: upscale(server.url, good, "sampler=magic"),
        "strength 2": lambda: upscale(server.url, good, "strength=2"),
        "negative seed": lambda: upscale(server.url, good, "seed=-1"),
        "outscale 0": lambda: upscale(server.url, good, "outscale=0"),
        "outscale over the scale": lambda: upscale(server.url, good, "outscale=2.5"),
        "deadline passed": lambda: upscale(server.url, good, "deadline=0.000001"),
        "unknown route": lambda: request(server.url + "/v2/nothing"),
        "wrong method": lambda: request(server.url + "/v1/upscale"),
    }
    code, headers, body = calls[case]()
    assert code == status
    assert headers["content-type"] == "application/json"
    error = json.loads(body)["error"]
    assert re.search(match, error) and "\n" not in error and len(error) < 400


def test_health_readiness_and_metrics(server):
    assert json.loads(get(server.url + "/healthz")[2]) == {"status": "ok"}
    status, _, body = get(server.url + "/readyz")
    assert status == 200 and json.loads(body)["tile_sides"] == [24, 48]
    upscale(server.url, png(), "seed=1")
    upscale(server.url, b"junk", content_type="image/png")
    status, headers, body = get(server.url + "/metrics")
    text = body.decode()
    assert status == 200 and headers["content-type"].startswith("text/plain")
    for name in ("sr3_queue_depth", "sr3_requests_in_flight", "sr3_tiles_per_call_bucket", "sr3_request_seconds_bucket",
                 "sr3_denoiser_call_seconds_bucket", "sr3_http_request_seconds_bucket"):
        assert name in text
    assert re.search(r'sr3_http_responses_total\{route="/v1/upscale",status="400"\} [1-9]', text)
    assert re.search(r'sr3_request_seconds_count\{outcome="ok"\} [1-9]', text)


def _resources(pid: int) -> tuple[int, int]:
    """(resident kB, open file descriptors) of a process."""
    status = Path(f"/proc/{pid}/status").read_text()
    rss = int(re.search(r"VmRSS:\s+(\d+)", status)[1])
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
def test_a_thousand_bad_requests_leave_memory_and_files_where_they_were(server):
    bad = [lambda: upscale(server.url, flat_png((250, 200))), lambda: upscale(server.url, b"\x89PNG\r\n\x1a\n" + bytes(500)),
           lambda: upscale(server.url, png(), "steps=0"), lambda: upscale(server.url, b"\x89PNG" + bytes(70_000)),
           lambda: upscale(server.url, png(), content_type="text/html")]
    for i in range(200):  # the allocator and the metrics reach their steady state
        bad[i % len(bad)]()
    rss_before, fds_before = _resources(server.process.pid)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        codes = list(pool.map(lambda i: bad[i % len(bad)]()[0], range(1000)))
    assert set(codes) <= {400, 413, 415, 422}
    rss_after, fds_after = _resources(server.process.pid)
    assert fds_after <= fds_before + 2
    assert rss_after - rss_before < 20 * 1024, f"{rss_before} kB -> {rss_after} kB"


def test_an_api_key_guards_the_service_in_constant_time(tiny_dir):
    server = Server(tiny_dir, "--api-key-env", "TEST_SR3_KEY", env={"TEST_SR3_KEY": "s3cret"})
    try:
        assert upscale(server.url, png())[0] == 401
        assert upscale(server.url, png(), headers={"Authorization": "Bearer wrong"})[0] == 401
        assert upscale(server.url, png(), "steps=0")[0] == 401  # the key before the parameters
        assert get(server.url + "/openapi.json")[0] == 404
        assert request(server.url + "/metrics")[0] == 401
        assert get(server.url + "/healthz")[0] == 200
        status, _, _ = upscale(server.url, png(), "seed=1", headers={"Authorization": "Bearer s3cret"})
        assert status == 200
    finally:
        assert server.stop() == 0


def test_a_full_queue_is_answered_503_with_retry_after(tiny_dir):
    # One request's pixels in flight, one waiting: a slow one runs, one waits, the next is refused.
    server = Server(tiny_dir, "--max-queue", "1", "--max-pixels-in-flight", "50000", "--tile-sides", "24")
    try:
        big = png((100, 100))
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            first = pool.submit(upscale, server.url, big, "seed=0&sampler=ancestral")
            _wait_for_metric(server.url, "sr3_requests_in_flight", 1)
            second = pool.submit(upscale, server.url, big, "seed=1&sampler=ancestral")
            _wait_for_metric(server.url, "sr3_queue_depth", 1)
            status, headers, body = upscale(server.url, png(), "seed=2")
            assert status == 503 and int(headers["retry-after"]) >= 1 and "queue is full" in json.loads(body)["error"]
            assert first.result()[0] == second.result()[0] == 200
    finally:
        assert server.stop() == 0


def _wait_for_metric(url: str, name: str, value: float) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        match = re.search(rf"^{name} (\S+)$", get(url + "/metrics")[2].decode(), flags=re.M)
        if match and float(match[1]) >= value:
            return
        time.sleep(0.02)
    raise AssertionError(f"{name} did not reach {value}")


def test_sigterm_answers_every_accepted_request_then_exits_0(tiny_dir):
    server = Server(tiny_dir, "--tile-sides", "24")
    results = []
    worker = threading.Thread(target=lambda: results.append(upscale(server.url, png((100, 100)), "seed=0")))
    worker.start()
    _wait_for_metric(server.url, "sr3_requests_in_flight", 1)
    server.process.send_signal(signal.SIGTERM)
    worker.join(120)
    assert results and results[0][0] == 200
    assert Image.open(io.BytesIO(results[0][2])).size == (200, 200)
    assert server.stop() == 0


def test_a_model_that_cannot_load_exits_2_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "sr3_engine", "serve", "--model", str(tmp_path / "nothing"),
                             "--port", "0", "--device", "cpu"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.count("error:") == 1 and result.stderr.strip().startswith("error:")


def test_an_address_in_use_exits_2_in_one_line(server, tiny_dir):
    port = server.url.rsplit(":", 1)[1]
    result = subprocess.run([sys.executable, "-m", "sr3_engine", "serve", "--model", str(tiny_dir), "--port", port,
                             "--device", "cpu", "--backend", "eager"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in result.stderr


def test_an_empty_api_key_is_refused_before_serving(tiny_dir):
    result = subprocess.run([sys.executable, "-m", "sr3_engine", "serve", "--model", str(tiny_dir), "--port", "0",
                             "--device", "cpu", "--backend", "eager"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120, env={**os.environ, "SR3_ENGINE_API_KEY": " "})
    assert result.returncode == 2 and "SR3_ENGINE_API_KEY: the API key is empty" in result.stderr


def test_an_upload_that_stalls_is_answered_408(server):
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as connection:
        connection.sendall(b"POST /v1/upscale HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                           b"Content-Length: 1000\r\n\r\n" + png()[:100])
        reply = b""
        while b"}" not in reply:
            chunk = connection.recv(65536)
            assert chunk, f"the connection closed after {reply!r}"
            reply += chunk
        reply = reply.decode(errors="replace")
    assert reply.startswith("HTTP/1.1 408") and "the upload took longer than 1 s" in reply


def test_a_client_that_hangs_up_cancels_its_request(tiny_dir):
    server = Server(tiny_dir, "--tile-sides", "24")
    try:
        host, port = server.url.removeprefix("http://").split(":")
        body = png((100, 100))
        connection = socket.create_connection((host, int(port)), timeout=30)
        connection.sendall(b"POST /v1/upscale?sampler=ancestral HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                           + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        _wait_for_metric(server.url, "sr3_requests_in_flight", 1)
        connection.close()
        deadline = time.monotonic() + 30
        while not re.search(r'sr3_request_seconds_count\{outcome="cancelled"\} 1', get(server.url + "/metrics")[2].decode()):
            assert time.monotonic() < deadline, "the request was not cancelled"
            time.sleep(0.1)
        assert re.search(r"^sr3_requests_in_flight 0", get(server.url + "/metrics")[2].decode(), flags=re.M)
    finally:
        assert server.stop() == 0
