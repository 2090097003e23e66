"""Serve a model over HTTP: POST image bytes to /v1/upscale, get a PNG back.

    python -m sr3_engine serve --model demo-x4 [--host 127.0.0.1] [--port 8000]
    python -m sr3_engine serve --model demo-x4 --ray [--replicas N | --max-replicas N]

One process, one engine, one scheduler that batches the tiles of every request in flight into
each denoiser call (`serving.scheduler`), behind a FastAPI app served by uvicorn
(`serving.http`, which lists the routes and the status codes). It listens on 127.0.0.1 unless
--host says otherwise. The first line printed says where it listens, what it serves and how;
/readyz answers 200 once warm-up is done. With the environment variable named by
--api-key-env set (SR3_ENGINE_API_KEY by default), /v1/* and /metrics need
`Authorization: Bearer <key>`.

SIGTERM or Ctrl-C drains: no new connection is taken, every request already accepted is
answered, then the process exits 0. A model that cannot be loaded, a bad setting or an address
that cannot be bound exits 2 with one `error:` line, before anything is served.

--ray serves the same app as a Ray Serve deployment (`serving.ray_serve`): one engine and
scheduler per replica, one GPU per replica on CUDA, on the Ray cluster that RAY_ADDRESS names
or a local one.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
from typing import Sequence

from ..io import DEFAULT_MAX_PIXELS
from ..runtime.engine import precision_name
from ..runtime.backends import ENGINE_BACKENDS
from ..serving.scheduler import SchedulerConfig
from ..serving.settings import (DEFAULT_MAX_UPLOAD_BYTES, DEFAULT_TIMEOUT, DEFAULT_UPLOAD_TIMEOUT, ServeSettings,
                                ServiceConfig)
from .common import (EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, UsageError, add_device_argument, add_dtype_argument, byte_size,
                     loaded_engine, non_negative_int, parse_device, positive_float, positive_int, print_error)

API_KEY_ENV = "SR3_ENGINE_API_KEY"
DEFAULT_MAX_CONNECTIONS = 256


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sr3_engine serve",
                                     description="Serve a model over HTTP (POST /v1/upscale).")
    parser.add_argument("--model", required=True, help="model directory or bundled model name")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=non_negative_int, default=8000, help="port (default 8000; 0: any free one)")
    parser.add_argument("--backend", choices=ENGINE_BACKENDS, default="fused", help="engine backend (default fused)")
    add_device_argument(parser, default="auto")
    add_dtype_argument(parser)
    parser.add_argument("--max-memory", type=byte_size, metavar="SIZE",
                        help="denoiser working memory, e.g. 2G (default: a share of the free memory)")
    parser.add_argument("--tile-sides", type=_sides, metavar="N,N,...",
                        help="tile sides in output pixels (default: 256, 128, 64 as memory allows)")
    parser.add_argument("--max-tiles-per-call", type=positive_int, metavar="N",
                        help="most tiles in one denoiser call (default: from memory and the device)")
    parser.add_argument("--max-pixels-in-flight", type=positive_int, metavar="N",
                        help="output pixels of the requests being sampled at once (default: from memory)")
    parser.add_argument("--max-queue", type=positive_int, default=SchedulerConfig.max_queued, metavar="N",
                        help=f"requests waiting for admission; more are answered 503 "
                        f"(default {SchedulerConfig.max_queued})")
    parser.add_argument("--aging", type=positive_float, default=SchedulerConfig.aging, metavar="SECONDS",
                        help="a waiting request's remaining work counts 1 / (1 + waited / SECONDS) in the "
                        f"shortest-first order, so none starves (default {SchedulerConfig.aging:g})")
    parser.add_argument("--max-upload", type=byte_size, default=DEFAULT_MAX_UPLOAD_BYTES, metavar="SIZE",
                        help=f"largest upload; larger ones are answered 413 (default {DEFAULT_MAX_UPLOAD_BYTES >> 20}M)")
    parser.add_argument("--max-pixels", type=positive_int, default=DEFAULT_MAX_PIXELS,
                        help=f"reject input images with more pixels (default {DEFAULT_MAX_PIXELS})")
    parser.add_argument("--upload-timeout", type=positive_float, default=DEFAULT_UPLOAD_TIMEOUT, metavar="SECONDS",
                        help=f"longest an upload may take to arrive; then 408 (default {DEFAULT_UPLOAD_TIMEOUT:g})")
    parser.add_argument("--max-connections", type=positive_int, default=DEFAULT_MAX_CONNECTIONS, metavar="N",
                        help=f"open connections; more are answered 503 (default {DEFAULT_MAX_CONNECTIONS})")
    parser.add_argument("--timeout", type=positive_float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                        help=f"longest a request may take; then 504 (default {DEFAULT_TIMEOUT:g})")
    parser.add_argument("--no-warm-up", action="store_true", help="report ready without warming up")
    parser.add_argument("--api-key-env", default=API_KEY_ENV, metavar="NAME",
                        help=f"environment variable holding the API key, if set (default {API_KEY_ENV})")
    parser.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    ray = parser.add_argument_group("Ray Serve")
    ray.add_argument("--ray", action="store_true", help="serve as a Ray Serve deployment")
    ray.add_argument("--replicas", type=positive_int, default=1, help="replicas (default 1)")
    ray.add_argument("--max-replicas", type=positive_int, metavar="N",
                     help="autoscale between --replicas and N replicas on requests in flight")
    return parser


def _sides(text: str) -> tuple[int, ...]:
    try:
        sides = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas; got {text!r}") from None
    if not sides or min(sides) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas; got {text!r}")
    return sides


def settings_from(args: argparse.Namespace) -> ServeSettings:
    """The service the flags describe; a bad value is a UsageError."""
    try:
        scheduler = SchedulerConfig(tile_sides=args.tile_sides, max_tiles_per_call=args.max_tiles_per_call,
                                    max_pixels_in_flight=args.max_pixels_in_flight, max_queued=args.max_queue,
                                    aging=args.aging)
    except ValueError as error:
        raise UsageError(str(error)) from None
    try:
        service = ServiceConfig(max_upload_bytes=args.max_upload, upload_timeout=args.upload_timeout,
                                max_pixels=args.max_pixels, timeout=args.timeout,
                                api_key=os.environ.get(args.api_key_env), warm_up=not args.no_warm_up)
    except ValueError as error:
        raise UsageError(f"{args.api_key_env}: {error}") from None
    # Under Ray the replicas' devices are the cluster's: `auto` is decided where they run.
    device = args.device if args.ray and args.device == "auto" else str(parse_device(args.device))
    return ServeSettings(model=args.model, backend=args.backend, device=device, dtype=args.dtype,
                         max_memory=args.max_memory, scheduler=scheduler, service=service)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s: %(name)s: %(message)s")
    try:
        settings = settings_from(args)
        if args.ray:
            try:
                from ..serving.ray_serve import run_on_ray
            except ImportError as error:
                raise UsageError(f"--ray needs Ray Serve ({error}): pip install 'sr3_engine[ray]'") from None
            try:
                return run_on_ray(settings, host=args.host, port=args.port, replicas=args.replicas,
                                  max_replicas=args.max_replicas, announce=_announce)
            except RuntimeError as error:
                raise UsageError(str(error)) from None
        return serve(settings, args.host, args.port, args.log_level, args.max_connections)
    except UsageError as error:
        print_error(str(error))
        return EXIT_USAGE


def serve(settings: ServeSettings, host: str, port: int, log_level: str, max_connections: int) -> int:
    try:
        import uvicorn

        from ..serving.http import Service, create_app
    except ImportError as error:
        raise UsageError(f"the serve command needs FastAPI, uvicorn and prometheus-client ({error}): "
                         "pip install 'sr3_engine[serve]'") from None
    engine = loaded_engine(settings.engine, model=settings.model, backend=settings.backend)
    try:
        service = Service.from_settings(settings, engine)
    except (ValueError, MemoryError) as error:
        raise UsageError(f"cannot serve {settings.model}: {error}") from None
    listener = _listen(host, port)
    bound_host, bound_port = listener.getsockname()[:2]
    scheduler = service.scheduler
    _announce(f"http://{_url_host(bound_host)}:{bound_port}", settings,
              f"tiles {'/'.join(map(str, scheduler.tile_sides))} px, "
              f"{'/'.join(str(scheduler.capacity[s]) for s in scheduler.tile_sides)} per call",
              precision=f"{precision_name(engine.dtype)}; {engine.dtype_reason}")
    config = uvicorn.Config(create_app(service), log_level=log_level, timeout_graceful_shutdown=None,
                            limit_concurrency=max_connections, access_log=log_level == "debug")
    # uvicorn drains on SIGTERM, then raises the signal again under the handler it found: a
    # handler that does nothing lets the drained process exit 0 instead of dying by the signal.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    drain = True
    try:
        uvicorn.Server(config).run(sockets=[listener])
    except KeyboardInterrupt:
        # A second Ctrl-C: uvicorn stopped waiting for its clients, so neither does the scheduler.
        drain = False
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        signal.signal(signal.SIGTERM, previous)
        listener.close()
        service.close(drain=drain)
    return EXIT_OK


def _announce(where: str, settings: ServeSettings, how: str = "", *, precision: str | None = None) -> None:
    """The first line; `precision` is the engine's when it was built here (Ray's replicas build their own)."""
    print(f"serving {settings.model} on {where} (backend {settings.backend} on {settings.device}, "
          f"{precision or settings.dtype}"
          f"{'; ' + how if how else ''})", flush=True)


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket bound here, so that an address in use is a one-line error, not a log."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen(2048)
    except OSError as error:
        raise UsageError(f"cannot listen on {host}:{port} ({error.strerror or error})") from None
    return listener


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host

