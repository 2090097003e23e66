"""The service as a Ray Serve deployment: the repository's config file builds it, and a local Ray
instance with two replicas answers from both."""

import concurrent.futures
import io
import socket
from pathlib import Path

import pytest
import torch
from PIL import Image

import sr3_engine as sr3

serve = pytest.importorskip("ray.serve")
yaml = pytest.importorskip("yaml")

from sr3_engine.serving import ray_serve  # noqa: E402
from sr3_engine.serving.scheduler import SchedulerConfig  # noqa: E402
from sr3_engine.serving.settings import ServeSettings  # noqa: E402
from tests.test_service import request  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "deploy" / "ray-serve.yaml"


def test_the_config_file_builds_the_deployment_it_configures():
    config = yaml.safe_load(CONFIG.read_text())
    (app,) = config["applications"]
    assert app["import_path"] == "sr3_engine.serving.ray_serve:build"
    assert [d["name"] for d in app["deployments"]] == [ray_serve.DEPLOYMENT_NAME]
    assert isinstance(ray_serve.build(app["args"]), serve.Application)
    settings = ray_serve.settings_from_args(app["args"])
    assert settings.model == "demo-x4" and settings.scheduler == SchedulerConfig(max_queued=64, aging=5.0)
    assert dict(settings.backend_options) == {"max_graphs": 64}
    with pytest.raises(ValueError, match="unknown settings \\['modle'\\]"):
        ray_serve.settings_from_args({"modle": "demo-x4"})


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_two_replicas_both_answer(tmp_path):
    import ray

    torch.manual_seed(1234)
    model = sr3.SR3UNet(sr3.UNetConfig.named("tiny")).eval()
    engine = sr3.SR3Engine(model, schedule=sr3.NoiseSchedule.linear(6, 1e-3, 0.2), scale=2,
                           sampler=sr3.SamplerConfig("ddim"), progress=False)
    directory = engine.save_pretrained(tmp_path / "tiny")
    settings = ServeSettings(model=str(directory), backend="eager", scheduler=SchedulerConfig(tile_sides=(24, 48)))
    buffer = io.BytesIO()
    Image.new("RGB", (12, 12), (100, 50, 20)).save(buffer, "PNG")
    port = _free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(ray_serve.deployment(settings, replicas=2), name="sr3", route_prefix="/")
        url = f"http://127.0.0.1:{port}/v1/upscale?seed=3"
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: request(url, buffer.getvalue(), {"Content-Type": "image/png"}),
                                    range(48)))
        assert {status for status, _, _ in answers} == {200}
        assert len({headers["x-served-by"] for _, headers, _ in answers}) == 2
        # Every replica serves the same model: the same seed gives the same bytes.
        assert len({body for _, _, body in answers}) == 1
    finally:
        serve.shutdown()
        ray.shutdown()
