"""The HTTP service as a Ray Serve deployment: one engine and scheduler per replica.

Each replica builds its own engine, scheduler and FastAPI app (`serving.http`) from the same
`ServeSettings`, once Ray has started it (`__serve_build_asgi_app__`), and Ray runs the app's
lifespan: warm-up when the replica starts, a drain when it stops. Ray's proxy spreads requests
over the replicas; inside a replica the scheduler batches the tiles of the requests it holds.
On CUDA each replica takes one GPU (`ray_actor_options={"num_gpus": 1}`), which Ray makes the
replica's `cuda` device.

Three ways to run it:

    python -m sr3_engine serve --model demo-x4 --ray --replicas 2
    python -m sr3_engine serve --model demo-x4 --ray --replicas 1 --max-replicas 4   # autoscaling
    serve run deploy/ray-serve.yaml                                                  # Ray's own CLI

`build(args)` is the application builder that `serve run` and the config file name; its
arguments are the settings' fields (model, backend, device, dtype, ...), and Ray's config file
sets replicas, autoscaling and resources per deployment (docs/SERVING.md shows the file).
Ray is an optional dependency: `pip install 'sr3_engine[ray]'`.
"""

from __future__ import annotations

import dataclasses
import signal
import threading
from typing import Any, Callable

from .scheduler import SchedulerConfig
from .settings import ServeSettings, ServiceConfig

DEPLOYMENT_NAME = "sr3"
# Requests a replica holds before the autoscaler adds one: enough to fill a few denoiser calls.
TARGET_ONGOING_REQUESTS = 8


def _import_serve():
    try:
        from ray import serve
    except ImportError as error:
        raise ImportError(f"Ray Serve is not installed ({error}): pip install 'sr3_engine[ray]'") from None
    return serve


def deployment(settings: ServeSettings, *, replicas: int = 1, max_replicas: int | None = None) -> Any:
    """The Ray Serve application for `settings`: `replicas` replicas, or autoscaling between
    `replicas` and `max_replicas` on requests in flight."""
    serve = _import_serve()
    options: dict[str, Any] = {"name": DEPLOYMENT_NAME, "max_ongoing_requests": 4 * TARGET_ONGOING_REQUESTS}
    if max_replicas is not None:
        options["autoscaling_config"] = {"min_replicas": replicas, "max_replicas": max(replicas, max_replicas),
                                         "target_ongoing_requests": TARGET_ONGOING_REQUESTS}
    else:
        options["num_replicas"] = replicas
    if settings.device.startswith("cuda"):
        options["ray_actor_options"] = {"num_gpus": 1}

    @serve.deployment(**options)
    @serve.ingress()
    class SR3Replica:
        def __init__(self, replica_settings: ServeSettings):
            self.settings = replica_settings

        def __serve_build_asgi_app__(self):
            from .http import Service, create_app

            return create_app(Service.from_settings(self.settings))

    return SR3Replica.bind(settings)


def build(args: dict[str, Any]) -> Any:
    """The application builder for `serve run` and config files (`settings_from_args`)."""
    return deployment(settings_from_args(args))


def settings_from_args(args: dict[str, Any]) -> ServeSettings:
    """`ServeSettings` from a config file's `args`: its fields, with `scheduler` and `service` as
    dicts of their own fields and `backend_options` as a dict."""
    fields = dict(args)
    if "scheduler" in fields:
        scheduler = dict(fields["scheduler"])
        if scheduler.get("tile_sides") is not None:
            scheduler["tile_sides"] = tuple(scheduler["tile_sides"])
        fields["scheduler"] = SchedulerConfig(**scheduler)
    if "service" in fields:
        fields["service"] = ServiceConfig(**fields["service"])
    if "backend_options" in fields:
        fields["backend_options"] = tuple(dict(fields["backend_options"]).items())
    known = {field.name for field in dataclasses.fields(ServeSettings)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"unknown settings {unknown}; expected some of {sorted(known)}")
    return ServeSettings(**fields)


def run_on_ray(settings: ServeSettings, *, host: str, port: int, replicas: int, max_replicas: int | None,
               announce: Callable[..., None]) -> int:
    """Start Ray Serve's HTTP proxy on host:port and the deployment, and serve until SIGTERM (exit
    code 0) or Ctrl-C (130); then shut Serve down, each replica draining. A deployment that
    cannot start raises RuntimeError in one line (the replicas' logs are in Ray's log folder)."""
    import ray

    serve = _import_serve()
    ray.init(ignore_reinit_error=True, log_to_driver=False)
    if settings.device == "auto":
        gpus = ray.cluster_resources().get("GPU", 0)
        settings = dataclasses.replace(settings, device="cuda" if gpus >= 1 else "cpu")
    stopped_by: list[int] = []
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stopped_by.append(signum)
        stop.set()

    previous = {signum: signal.signal(signum, on_signal) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        serve.start(http_options={"host": host, "port": port})
        try:
            serve.run(deployment(settings, replicas=replicas, max_replicas=max_replicas), name=DEPLOYMENT_NAME,
                      route_prefix="/")
        except Exception as error:  # noqa: BLE001  (Ray wraps the replica's failure in its own types)
            first = next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)
            raise RuntimeError(f"the Ray Serve deployment did not start: {first.strip()}") from None
        how = f"{replicas} to {max_replicas} replicas" if max_replicas else f"{replicas} replica(s)"
        announce(f"http://{host}:{port} through Ray Serve", settings, how)
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 128 + signal.SIGINT if signal.SIGINT in stopped_by else 0
