"""The HTTP service: an ASGI app (FastAPI) in front of one engine and its `Scheduler`.

    POST /v1/upscale?steps=&sampler=&strength=&seed=&outscale=&deadline=   image bytes -> PNG
    GET  /healthz    the process answers
    GET  /readyz     200 once warm-up is done, 503 before (and while draining)
    GET  /metrics    Prometheus text: queue, requests in flight, tiles per call, latencies, rejections

Hostile input is answered, never served: an upload over `max_upload_bytes` is 413 (from its
Content-Length when it sends one, else as soon as the body passes the limit, without reading
the rest), and one slower than `upload_timeout` 408; an image over `max_pixels` is 413 before
it is decoded (the decompression-bomb guard of the upscale command, `io.decode_image`); a body
in no image format we decode, or a Content-Type that is not an image, is 415; a corrupt image
400; a parameter out of range 422; a request that cannot finish within its deadline 504; a
full queue 503 with Retry-After. Every error is a JSON body {"error": "<one line>"}. Clients
send bytes, never paths.

The response is a PNG with headers X-Seed (the seed that reproduces it), X-Tile-Side,
X-Queue-Seconds / X-Sample-Seconds and X-Served-By (host:pid of the process that answered).
An alpha channel is upscaled bicubically and re-attached, and `outscale` resizes the output as
the upscale command's --outscale does.

With an API key (`ServiceConfig.api_key`, from an environment variable in the serve command),
/v1/* and /metrics need `Authorization: Bearer <key>`, compared in constant time.

Lifecycle: the app's lifespan starts warm-up in a thread (`Scheduler.warm_up`: every tile
shape at every batch size, so that backends that trace or capture a shape have done so; then
one request of each tile side) and, at shutdown (uvicorn runs it after answering every open
request, e.g. on SIGTERM), closes the scheduler after it has finished everything it accepted.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import io
import logging
import os
import socket
import threading
import time
from typing import AsyncIterator, Literal

import torch
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ..io import (ImageError, ImageFormatError, ImageTooLargeError, decode_image, one_line,
                  outscaled, pil_to_tensor, tensor_to_pil)
from ..runtime.engine import SR3Engine, with_alpha
from ..samplers import SAMPLERS
from .scheduler import (MAX_SEED, DeadlineExceeded, QueueFullError, RequestTooLargeError, Scheduler,
                        SchedulerClosedError, Served)
from .settings import ServeSettings, ServiceConfig

logger = logging.getLogger(__name__)

# How often a waiting handler looks for a client that hung up, and how long past its deadline it
# waits for the scheduler.
DISCONNECT_POLL_S = 0.5
RESULT_GRACE_S = 30.0
# Content types a client may label image bytes with; a missing one is taken as bytes too.
IMAGE_CONTENT_TYPES = ("image/", "application/octet-stream")
SamplerName = Literal[tuple(SAMPLERS)]  # type: ignore[valid-type]


class ServiceError(Exception):
    """An HTTP error answered as {"error": message}."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, " ".join(message.split()), headers or {}


class ServiceMetrics:
    """The scheduler's reports and the HTTP outcomes as Prometheus metrics in a registry of
    the service's own (several services in one process do not collide)."""

    def __init__(self, scheduler_stats):
        self.registry = CollectorRegistry()
        Gauge("sr3_queue_depth", "Requests waiting for admission", registry=self.registry).set_function(
            lambda: scheduler_stats()["queued"])
        Gauge("sr3_requests_in_flight", "Requests being sampled", registry=self.registry).set_function(
            lambda: scheduler_stats()["running"])
        Gauge("sr3_pixels_in_flight", "Padded output pixels of the requests being sampled",
              registry=self.registry).set_function(lambda: scheduler_stats()["pixels_in_flight"])
        self.tiles_per_call = Histogram("sr3_tiles_per_call", "Tiles in one denoiser call", ["tile_side"],
                                        buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=self.registry)
        self.call_seconds = Histogram("sr3_denoiser_call_seconds", "Duration of one denoiser call", ["tile_side"],
                                      buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10),
                                      registry=self.registry)
        self.request_seconds = Histogram("sr3_request_seconds", "Submission to result, by outcome", ["outcome"],
                                         buckets=(.05, .1, .25, .5, 1, 2.5, 5, 10, 25, 50, 100, 250, 600),
                                         registry=self.registry)
        self.output_pixels = Counter("sr3_output_pixels", "Output pixels served", registry=self.registry)
        self.rejections = Counter("sr3_rejections", "Requests refused, by reason", ["reason"], registry=self.registry)
        self.responses = Counter("sr3_http_responses", "HTTP responses, by route and status", ["route", "status"],
                                 registry=self.registry)
        self.http_seconds = Histogram("sr3_http_request_seconds", "HTTP request duration, by route", ["route"],
                                      buckets=(.01, .05, .1, .25, .5, 1, 2.5, 5, 10, 25, 50, 100, 250, 600),
                                      registry=self.registry)

    def denoiser_call(self, tiles: int, tile_side: int, seconds: float) -> None:
        self.tiles_per_call.labels(str(tile_side)).observe(tiles)
        self.call_seconds.labels(str(tile_side)).observe(seconds)

    def finished(self, outcome: str, seconds: float, output_pixels: int) -> None:
        self.request_seconds.labels(outcome).observe(seconds)
        self.output_pixels.inc(output_pixels)

    def rejected(self, reason: str) -> None:
        self.rejections.labels(reason).inc()


class Service:
    """One scheduler behind the routes, its metrics and its readiness."""

    def __init__(self, scheduler_factory, config: ServiceConfig = ServiceConfig(), *, name: str = "model"):
        """`scheduler_factory(metrics) -> Scheduler` (the service owns what it returns)."""
        self.config = config
        self.name = name
        self._stats = lambda: self.scheduler.stats()
        self.metrics = ServiceMetrics(self._stats)
        self.scheduler: Scheduler = scheduler_factory(self.metrics)
        self.ready = threading.Event()
        self.warm_up_error: str | None = None

    @classmethod
    def from_settings(cls, settings: ServeSettings, engine: SR3Engine | None = None) -> "Service":
        """The service `settings` describe, on `engine` (default: `settings.engine()`)."""
        engine = engine if engine is not None else settings.engine()
        return cls(lambda metrics: Scheduler(engine, settings.scheduler, metrics=metrics), settings.service,
                   name=settings.model)

    def warm_up(self) -> None:
        """Run the scheduler's warm-up (every tile shape and batch size it will call), then one
        request of each tile side, then report ready. A failure is kept and keeps the service
        unready."""
        try:
            if self.config.warm_up:
                self.scheduler.warm_up()
                scale = self.scheduler.engine.scale
                for side in self.scheduler.tile_sides:
                    low = max(1, side // scale)
                    self.scheduler.submit(torch.full((3, low, low), 0.5), seed=0).result()
            self.ready.set()
        except SchedulerClosedError:
            return
        except Exception as error:  # noqa: BLE001  (reported by /readyz and the log)
            self.warm_up_error = one_line(error)
            logger.exception("warm-up failed")

    def close(self, *, drain: bool = True) -> None:
        self.ready.clear()
        self.scheduler.close(drain=drain)

    def check_key(self, request: Request) -> None:
        """401 unless the request carries the API key (when one is set)."""
        key = self.config.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise ServiceError(401, "missing or wrong API key (send Authorization: Bearer <key>)",
                               {"WWW-Authenticate": "Bearer"})


def create_app(service: Service) -> FastAPI:
    """The ASGI app serving `service`; its lifespan warms the service up and closes it."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        threading.Thread(target=service.warm_up, name="sr3-warm-up", daemon=True).start()
        yield
        await run_in_threadpool(service.close)

    # The API schema and its pages would be open to callers without the key.
    documented = service.config.api_key is None
    app = FastAPI(title="sr3_engine", summary="SR3 image super-resolution", lifespan=lifespan,
                  openapi_url="/openapi.json" if documented else None)
    app.state.service = service
    app.add_middleware(_CountResponses, metrics=service.metrics)

    def authorized(request: Request) -> None:
        service.check_key(request)

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, error: ServiceError) -> JSONResponse:
        return JSONResponse({"error": error.message}, status_code=error.status, headers=error.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_parameter(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ())[1:]) or "request"
        more = f" (and {len(error.errors()) - 1} more)" if len(error.errors()) > 1 else ""
        return JSONResponse({"error": one_line(ValueError(f"{where}: {first.get('msg', 'invalid')}{more}"))},
                            status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": " ".join(str(error.detail).split())}, status_code=error.status_code,
                            headers=getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception) -> JSONResponse:
        # The server logs the traceback; the client learns nothing of the internals.
        return JSONResponse({"error": "internal error (the server's log has the details)"}, status_code=500)

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        if service.ready.is_set() and not service.scheduler.closed:
            return JSONResponse({"status": "ready", "model": service.name,
                                 "tile_sides": list(service.scheduler.tile_sides)})
        broken = service.scheduler.broken and f"the scheduler stopped on an error: {service.scheduler.broken}"
        reason = broken or service.warm_up_error or ("draining" if service.scheduler.closed else "warming up")
        return JSONResponse({"error": f"not ready: {reason}"}, status_code=503, headers={"Retry-After": "1"})

    @app.get("/metrics", dependencies=[Depends(authorized)])
    async def metrics() -> Response:
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # The key is checked first (a dependency runs before the parameters are validated).
    @app.post("/v1/upscale", response_class=Response, dependencies=[Depends(authorized)],
              responses={200: {"content": {"image/png": {}}, "description": "The upscaled image as a PNG"}})
    async def upscale(
        request: Request,
        steps: int | None = Query(None, ge=1, le=10_000, description="sampling steps (default: the model's)"),
        sampler: SamplerName | None = Query(None, description="default: the model's sampler"),
        strength: float | None = Query(None, gt=0.0, le=1.0, description="fraction of the schedule run"),
        seed: int | None = Query(None, ge=0, le=MAX_SEED, description="noise seed (default: random, see X-Seed)"),
        outscale: float | None = Query(None, gt=0.0, description="resize to this x the input, at most the scale"),
        deadline: float | None = Query(None, gt=0.0, description="seconds the caller will wait"),
    ) -> Response:
        """Image bytes (PNG, JPEG, WebP, TIFF or BMP) in the body; the upscaled PNG back."""
        scale = service.scheduler.engine.scale
        if outscale is not None and outscale > scale:
            raise ServiceError(422, f"outscale: must be at most the model's scale {scale}; got {outscale:g}")
        if service.scheduler.closed:
            raise ServiceError(503, "the service is shutting down", {"Retry-After": "1"})
        content_type = request.headers.get("content-type", "application/octet-stream").lower()
        if not content_type.startswith(IMAGE_CONTENT_TYPES):
            raise ServiceError(415, f"Content-Type {content_type!r} is not an image; send the image bytes "
                               "as image/png, image/jpeg, ... or application/octet-stream")
        data = await _read_body(request, service.config.max_upload_bytes, service.config.upload_timeout)
        try:
            image = await run_in_threadpool(decode_image, data, service.config.max_pixels)
        except ImageTooLargeError as error:
            raise ServiceError(413, str(error)) from None
        except ImageFormatError as error:
            raise ServiceError(415, str(error)) from None
        except ImageError as error:
            raise ServiceError(400, str(error)) from None
        finally:
            del data
        timeout = min(deadline, service.config.timeout) if deadline is not None else service.config.timeout
        try:
            future = await run_in_threadpool(lambda: service.scheduler.submit(
                pil_to_tensor(image), steps=steps, sampler=sampler, strength=strength, seed=seed, deadline=timeout))
        except QueueFullError as error:
            raise ServiceError(503, str(error), {"Retry-After": str(round(error.retry_after))}) from None
        except SchedulerClosedError as error:
            raise ServiceError(503, str(error), {"Retry-After": "1"}) from None
        except RequestTooLargeError as error:
            raise ServiceError(413, str(error)) from None
        except ValueError as error:
            raise ServiceError(422, one_line(error)) from None
        served = await _result(request, future, timeout)
        png = await run_in_threadpool(_encode, served, image, outscale)
        return Response(png, media_type="image/png", headers={
            "X-Seed": str(served.seed), "X-Tile-Side": str(served.tile_side),
            "X-Queue-Seconds": f"{served.queued:.4f}", "X-Sample-Seconds": f"{served.sampled:.4f}",
            "X-Served-By": SERVED_BY})

    return app


_ROUTES = ("/v1/upscale", "/healthz", "/readyz", "/metrics")
# Which process answered (host:pid): behind Ray Serve, which replica.
SERVED_BY = f"{socket.gethostname()}:{os.getpid()}"


async def _read_body(request: Request, limit: int, timeout: float) -> bytearray:
    """The body; 413 once it passes `limit` bytes (from Content-Length, or while streaming), 408
    when it takes longer than `timeout` seconds to arrive, 499 when the client hangs up."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ServiceError(413, f"the upload is {int(declared)} bytes; the limit is {limit}")
    body = bytearray()
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise ServiceError(413, f"the upload is over the limit of {limit} bytes")
    except TimeoutError:
        raise ServiceError(408, f"the upload took longer than {timeout:g} s") from None
    except ClientDisconnect:
        raise ServiceError(499, "the client closed the connection during the upload") from None
    return body


async def _result(request: Request, future, timeout: float) -> Served:
    """The scheduler's result. A client that hangs up, or a handler that is cancelled (Ray Serve
    does so when its caller goes), cancels the request, which frees its tiles at the next call."""
    waiting = asyncio.wrap_future(future)
    # The scheduler enforces the deadline; this bound only guards against a scheduler that cannot.
    give_up = time.monotonic() + timeout + RESULT_GRACE_S
    try:
        while not waiting.done():
            await asyncio.wait({waiting}, timeout=DISCONNECT_POLL_S)
            if waiting.done():
                break
            if time.monotonic() > give_up:
                future.cancel()
                raise ServiceError(504, f"no result within {timeout:g} s")
            if await request.is_disconnected():
                future.cancel()
                raise ServiceError(499, "the client closed the connection")
    except asyncio.CancelledError:
        future.cancel()
        raise
    try:
        return waiting.result()
    except DeadlineExceeded as error:
        raise ServiceError(504, str(error)) from None
    except SchedulerClosedError as error:
        raise ServiceError(503, str(error), {"Retry-After": "1"}) from None
    except FloatingPointError as error:
        raise ServiceError(500, f"sampling failed: {one_line(error)}") from None


class _CountResponses:
    """Counts every response by route and status, and times it (plain ASGI: a Starlette
    `BaseHTTPMiddleware` would hide a client's disconnect from the route)."""

    def __init__(self, app, metrics: ServiceMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = scope["path"] if scope["path"] in _ROUTES else "other"
        status = [500]

        async def sending(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        started = time.perf_counter()
        try:
            await self.app(scope, receive, sending)
        finally:
            self.metrics.responses.labels(route, str(status[0])).inc()
            self.metrics.http_seconds.labels(route).observe(time.perf_counter() - started)


def _encode(served: Served, source, outscale: float | None) -> bytes:
    image = with_alpha(source, tensor_to_pil(served.image))
    if outscale is not None:
        image = outscaled(image, source.size, outscale)
    buffer = io.BytesIO()
    # The fastest deflate: at the default level, encoding took 30 ms of a 64x64 request's 400.
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()
