"""The serving scheduler: one worker per device that batches tiles of many requests, each at its
own step, into every denoiser call.

SR3's denoiser takes one noise level per image of its batch, and tiled sampling (runtime/tiling.py)
already cuts every image into tiles of one shape whose outputs are blended at every step. So
tiles of different requests, each at its own step of its own plan, can share one call: the
continuous batching of language-model serving, applied to diffusion super-resolution.

Requests. `submit` checks the image and the settings in the caller's thread and returns a
`concurrent.futures.Future` at once; the condition, plan and initial state are built when the
request is admitted, so a queued request holds only its small input image. The request is cut into
square tiles of one side from `tile_sides` (a few shape classes, output pixels): the smallest
side whose grid covers the image with at most `TILE_SLACK` (15%) more denoised pixels than the
fewest any side needs, since shorter calls make every other request wait less for the call in
progress and spread a large request over more of them; an image smaller than its tile is padded
up to it (the condition by replicating its edge, as
`diffusion.condition` pads to the U-Net's multiple). A request's output depends only on its
image, its settings and its seed: its noise comes from its own CPU generator, seeded by
`seed`, drawn as `SR3Engine.sample` draws it (the initial state, then each step's noise as the
backend's `step_noise` takes it: the generator's draws, or on fused CUDA a seed for the posterior
kernel), and its tiles are blended in grid order whatever calls they travel in. When its output
is exactly one tile it equals `engine.sample` with that seed, to the float32 rounding that the
batch size of a call can change.

The worker. Each iteration it (1) drops requests whose caller cancelled their future or whose
deadline passed, so their tiles leave at the next call; (2) admits waiting requests while the
pixels in flight stay within `max_pixels_in_flight`; (3) picks one denoiser call: the first
request in the service order decides the tile shape, then requests of that shape in service
order give the remaining tiles of their current step, up to the shape's capacity; (4) runs the
call, with one noise level per tile; (5) blends every tile's output into its request, and a
request whose step's tiles are all back is advanced by `samplers.posterior_update` with its own
plan, noise and multistep history; a request past its last step is finished and its future set.

Service order (fairness as data, see `SchedulerConfig`): shortest remaining work first (the
denoised pixels left in a request's plan), aged: a request's remaining work counts divided by
1 + (seconds since it was submitted) / `aging`. A new small request therefore goes before a large
one and waits for at most the call in progress, never for the large one's whole run; and a
request that has waited k x `aging` seconds goes before fresh ones k + 1 times smaller, so no
request starves however many small ones keep coming. Admission is first come, first served,
except that a request that fits may pass one that does not, until that one has waited `aging`.

Limits. `max_queued` requests may wait for admission; past it `submit` raises `QueueFullError`
at once, with a retry-after estimate. A request needing more pixels than `max_pixels_in_flight`
(the state of an admitted request: about `STATE_BYTES_PER_PIXEL` bytes per padded output pixel)
is refused with `RequestTooLargeError`. Capacity of a call: as many tiles as the denoiser's
memory budget holds (`tiling.working_bytes`, the engine's `max_memory`), at most
`max_tiles_per_call`; by default on the CPU as many as the backend runs in one slice
(`images_per_call`; one elsewhere), since a CPU computes no faster on larger batches and a
larger call only makes every request in it wait; on CUDA at most 32.

`close()` stops admitting, finishes everything accepted, then returns; `close(drain=False)`
fails what is left with `SchedulerClosedError`. An unexpected error in the worker fails every
request it holds and closes the scheduler (`broken` says why), so no future waits forever.
`warm_up()` runs every tile side at every batch size a call can have, twice, before serving,
so that backends that trace or capture a shape (fused) do so before the first request.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import logging
import math
import secrets
import threading
import time
from typing import Callable, Protocol

import torch

from ..config import UNetConfig
from ..diffusion import output_image, pad_to, padded_length
from ..samplers import (NoiseSource, SamplerConfig, SamplingPlan, finish_sampling, make_plan, posterior_update,
                        raise_if_nonfinite, start_sampling)
from ..schedules import NoiseSchedule
from ..runtime.engine import SR3Engine
from ..runtime.tiling import (WORKSPACE_BYTES, MemoryBudgetError, TileBlender, default_budget, default_overlap,
                              fixed_grid, working_bytes)

logger = logging.getLogger(__name__)

# float32 per padded output pixel and channel of an admitted request: condition, state, blended
# output, multistep history, the step's noise and the posterior step's temporaries.
STATE_BYTES_PER_PIXEL = 3 * 4 * 8
DEFAULT_LARGEST_TILE = 256
DEFAULT_CUDA_TILES_PER_CALL = 32
# How many more denoised pixels a smaller tile side may cost than the side that costs fewest.
TILE_SLACK = 0.15
MAX_SEED = 2**63 - 1


class SchedulerError(RuntimeError):
    """A request the scheduler will not take now; the message is one line."""


class QueueFullError(SchedulerError):
    """The queue is full; `retry_after` estimates the seconds until there is room."""

    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = retry_after


class SchedulerClosedError(SchedulerError):
    """The scheduler is shutting down and admits nothing more."""


class RequestTooLargeError(ValueError):
    """One request needs more pixels in flight than the scheduler ever allows."""


class DeadlineExceeded(TimeoutError):
    """The request's deadline passed before its last step."""


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """Limits and fairness of a `Scheduler`; None means derived from the model and memory.

    `tile_sides`: the square tile shapes (output pixels, multiples of the U-Net's size
    multiple) requests are cut into; default 256 (or the largest power-of-two side the memory
    budget holds), its half and quarter, and each of them plus its overlap (272, 144, 80 for
    demo-x4), so that n tiles of one cover n times its base exactly.
    `max_tiles_per_call`: most tiles of one denoiser call.
    `max_pixels_in_flight`: padded output pixels of all admitted requests together; default a
    memory budget's worth of request state. `max_queued`: requests waiting for admission.
    `aging`: seconds over which a waiting request's remaining work counts one more time less in
    the service order (and how long a request waits for admission before none may pass it).
    """

    tile_sides: tuple[int, ...] | None = None
    max_tiles_per_call: int | None = None
    max_pixels_in_flight: int | None = None
    max_queued: int = 64
    aging: float = 5.0

    def __post_init__(self) -> None:
        if self.tile_sides is not None and (not self.tile_sides or any(
                isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in self.tile_sides)):
            raise ValueError(f"SchedulerConfig.tile_sides must be positive ints; got {self.tile_sides!r}")
        for name in ("max_tiles_per_call", "max_pixels_in_flight"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"SchedulerConfig.{name} must be a positive int or None; got {value!r}")
        if isinstance(self.max_queued, bool) or not isinstance(self.max_queued, int) or self.max_queued < 1:
            raise ValueError(f"SchedulerConfig.max_queued must be a positive int; got {self.max_queued!r}")
        if not (isinstance(self.aging, (int, float)) and math.isfinite(self.aging) and self.aging > 0):
            raise ValueError(f"SchedulerConfig.aging must be a positive number of seconds; got {self.aging!r}")


@dataclasses.dataclass(frozen=True)
class Served:
    """A finished request: `image` (3, h * scale, w * scale) float32 in [0, 1] on the CPU, the
    `seed` its noise came from, its tile side and how long it waited and ran (seconds)."""

    image: torch.Tensor
    seed: int
    tile_side: int
    tiles: int
    queued: float
    sampled: float


class SchedulerMetrics(Protocol):
    """What a scheduler reports as it serves (the service turns it into Prometheus metrics)."""

    def denoiser_call(self, tiles: int, tile_side: int, seconds: float) -> None: ...

    def finished(self, outcome: str, seconds: float, output_pixels: int) -> None: ...

    def rejected(self, reason: str) -> None: ...


class _NoMetrics:
    def denoiser_call(self, tiles: int, tile_side: int, seconds: float) -> None:
        pass

    def finished(self, outcome: str, seconds: float, output_pixels: int) -> None:
        pass

    def rejected(self, reason: str) -> None:
        pass


@dataclasses.dataclass(eq=False)
class _Request:
    """One request: what `submit` checked, then, once admitted, its sampling state (which only
    the worker thread touches)."""

    seq: int
    future: concurrent.futures.Future
    seed: int
    lr: torch.Tensor
    schedule: NoiseSchedule
    sampler: SamplerConfig
    side: int
    tiles_per_step: int
    num_steps: int
    pixels: int
    submitted: float
    deadline: float | None
    crop: tuple[int, int] = (0, 0)
    x_up: torch.Tensor | None = None
    tiles_x: torch.Tensor | None = None
    plan: SamplingPlan | None = None
    y: torch.Tensor | None = None
    blender: TileBlender | None = None
    noise: NoiseSource | None = None
    nonfinite: torch.Tensor | None = None
    history: torch.Tensor | None = None
    output: torch.Tensor | None = None
    step: int = 0
    next_tile: int = 0
    admitted: float = 0.0

    @property
    def remaining_work(self) -> int:
        tiles = (self.num_steps - self.step) * self.tiles_per_step - self.next_tile
        return tiles * self.side * self.side


class Scheduler:
    """Serve `engine` (its backend, model, schedule and default sampler) to many callers: see the
    module docstring. `submit` may be called from any thread; one worker thread runs the
    denoiser. Use as a context manager, or call `close`."""

    def __init__(self, engine: SR3Engine, config: SchedulerConfig = SchedulerConfig(), *,
                 metrics: SchedulerMetrics | None = None):
        self.engine = engine
        self.config = config
        self.metrics = metrics if metrics is not None else _NoMetrics()
        model_config = getattr(engine.model, "config", None)
        self._model_config = model_config if isinstance(model_config, UNetConfig) else None
        self._budget = engine.max_memory if engine.max_memory is not None else default_budget(engine.device)
        self.tile_sides = self._tile_sides()
        self.capacity = {side: self._capacity(side) for side in self.tile_sides}
        self.max_pixels_in_flight = config.max_pixels_in_flight or max(
            max(self.tile_sides) ** 2, self._budget // STATE_BYTES_PER_PIXEL)
        self._denoisers = {side: engine.backend.tile_denoiser(self.capacity[side]) for side in self.tile_sides}
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        # Work that must run on the worker's thread (warm-up), with the future it resolves.
        self._chores: list[tuple[Callable[[], None], concurrent.futures.Future]] = []
        self._waiting: list[_Request] = []
        self._running: list[_Request] = []
        self._closed = False
        self.broken: str | None = None
        self._seq = 0
        self._pixels_per_second = 0.0
        self._worker = threading.Thread(target=self._serve, name="sr3-scheduler", daemon=True)
        self._worker.start()

    def __enter__(self) -> "Scheduler":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _tile_sides(self) -> tuple[int, ...]:
        multiple = self.engine.size_multiple
        _, largest_side = self.engine.backend.tile_limits
        if self.config.tile_sides is not None:
            sides = sorted(set(self.config.tile_sides))
            for side in sides:
                if side % multiple or side < 2 * default_overlap(side, multiple) + multiple:
                    raise ValueError(f"tile side {side} must be a multiple of the model's size multiple {multiple} "
                                     f"and at least {2 * default_overlap(side, multiple) + multiple}")
        else:
            largest = DEFAULT_LARGEST_TILE // multiple * multiple
            while self._model_config is not None and largest > multiple and \
                    working_bytes(self._model_config, 1, largest + 2 * default_overlap(largest, multiple),
                                  largest + 2 * default_overlap(largest, multiple),
                                  self.engine.dtype.itemsize) > self._budget:
                largest = largest // 2 // multiple * multiple
            bases = {largest, largest // 2 // multiple * multiple, largest // 4 // multiple * multiple}
            # Each base side, and the base plus its overlap: n tiles of that cover n x base exactly,
            # so outputs of power-of-two sides are tiled with no more than the overlaps.
            sides = sorted({side for base in bases for side in (base, base + default_overlap(base, multiple))
                            if base >= 2 * default_overlap(base, multiple) + multiple} or {largest})
        if largest_side is not None:
            sides = [side for side in sides if side <= largest_side]
            if not sides:
                raise ValueError(f"every tile side is over the backend's largest tile side {largest_side}")
        for side in sides:
            if self._model_config is not None:
                need = working_bytes(self._model_config, 1, side, side, self.engine.dtype.itemsize)
                if need > self._budget:
                    raise MemoryBudgetError(f"a {side}x{side} tile needs {need / 2**20:.0f} MiB of working memory; "
                                            f"the budget is {self._budget / 2**20:.0f} MiB")
        return tuple(sides)

    def _capacity(self, side: int) -> int:
        most_tiles, _ = self.engine.backend.tile_limits
        if self.config.max_tiles_per_call is not None:
            capacity = self.config.max_tiles_per_call
        elif self.engine.device.type == "cuda":
            capacity = DEFAULT_CUDA_TILES_PER_CALL
        else:
            images_per_call = getattr(self.engine.backend, "images_per_call", None)
            capacity = (images_per_call(side, side) if images_per_call is not None else None) or 1
        if self._model_config is not None:
            per_tile = working_bytes(self._model_config, 1, side, side, self.engine.dtype.itemsize) - WORKSPACE_BYTES
            capacity = min(capacity, (self._budget - WORKSPACE_BYTES) // per_tile)
        if most_tiles is not None:
            capacity = min(capacity, most_tiles)
        return max(1, capacity)

    def tiling_for(self, height: int, width: int) -> tuple[int, int, int]:
        """(tile side, tiles, padded pixels) for an output of height x width padded to the size
        multiple: the smallest side that denoises at most TILE_SLACK more pixels than the side
        that denoises the fewest."""
        options = []
        for side in self.tile_sides:
            size = (max(height, side), max(width, side))
            grid = fixed_grid(size, side, default_overlap(side, self.engine.size_multiple), 1)
            options.append((grid.count * side * side, side, grid.count, size[0] * size[1]))
        fewest = min(option[0] for option in options)
        _, side, count, pixels = min((o for o in options if o[0] <= (1 + TILE_SLACK) * fewest), key=lambda o: o[1])
        return side, count, pixels

    def warm_up(self) -> None:
        """Run every tile side at every batch size a call can have (on CUDA: one and the
        capacity) twice, so that a backend that traces or captures a shape has done so; in the
        worker thread, between calls, like every denoiser call (one thread's pool of compute
        threads, not one per calling thread)."""
        done: concurrent.futures.Future = concurrent.futures.Future()
        with self._wake:
            if self._closed:
                raise SchedulerClosedError("the scheduler is shutting down")
            self._chores.append((self._warm_up, done))
            self._wake.notify()
        done.result()

    def _warm_up(self) -> None:
        engine = self.engine
        for side, denoise in self._denoisers.items():
            capacity = self.capacity[side]
            sizes = (1, capacity) if engine.device.type == "cuda" else range(1, capacity + 1)
            for n in sorted(set(sizes)):
                x = torch.zeros(n, 3, side, side, dtype=engine.dtype, device=engine.device)
                level = torch.full((n,), 0.5, device=engine.device)
                for _ in range(2):
                    denoise(x, x, level)

    def submit(self, image: torch.Tensor, *, steps: int | None = None, sampler: str | SamplerConfig | None = None,
               strength: float | None = None, seed: int | None = None,
               deadline: float | None = None) -> concurrent.futures.Future:
        """Queue one image, (3, h, w) or (1, 3, h, w) float in [0, 1], for super-resolution; the
        future's result is a `Served`. `steps`, `sampler` and `strength` override the engine's
        (as `SR3Engine.sample` does); `seed` (default: a random one, reported in the result)
        seeds the request's own noise; `deadline` is seconds from now after which the request
        fails with `DeadlineExceeded`. Cancelling the future drops the request at the next
        call. Raises ValueError for a bad image or setting, `RequestTooLargeError`,
        `QueueFullError` or `SchedulerClosedError`, at once."""
        submitted = time.monotonic()
        lr = self.engine.check_input(image[None] if isinstance(image, torch.Tensor) and image.dim() == 3 else image)
        if lr.shape[0] != 1:
            raise ValueError(f"Scheduler.submit: one image at a time; got a batch of {lr.shape[0]}")
        if seed is None:
            seed = secrets.randbits(63)
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
            raise ValueError(f"Scheduler.submit: seed must be an int in [0, 2**63 - 1]; got {seed!r}")
        if deadline is not None and not (math.isfinite(deadline) and deadline > 0):
            raise ValueError(f"Scheduler.submit: deadline must be a positive number of seconds; got {deadline!r}")
        try:
            schedule = self.engine.schedule_for(steps)
        except ValueError:
            raise ValueError(f"steps must be in [1, {self.engine.schedule.config.steps}] for this model's schedule; "
                             f"got {steps}") from None
        config = self.engine.sampler_config(sampler, strength=strength)
        num_steps = make_plan(schedule, config, self.engine.prediction).num_steps
        # Sized from the input's shape, before the condition (scale^2 times its pixels) exists.
        multiple, scale = self.engine.size_multiple, self.engine.scale
        side, tiles, pixels = self.tiling_for(padded_length(lr.shape[-2] * scale, multiple),
                                              padded_length(lr.shape[-1] * scale, multiple))
        if pixels > self.max_pixels_in_flight:
            self.metrics.rejected("too_large")
            raise RequestTooLargeError(f"the output needs {pixels} pixels in flight (padded); the scheduler allows "
                                       f"{self.max_pixels_in_flight}")
        request = _Request(seq=0, future=concurrent.futures.Future(), seed=seed, lr=lr.detach().float().cpu(),
                           schedule=schedule, sampler=config, side=side, tiles_per_step=tiles, num_steps=num_steps,
                           pixels=pixels, submitted=submitted, deadline=None if deadline is None else submitted + deadline)
        with self._wake:
            self._refuse_if_full()
            self._seq += 1
            request.seq = self._seq
            self._waiting.append(request)
            self._wake.notify()
        return request.future

    def _refuse_if_full(self) -> None:
        if self._closed:
            self.metrics.rejected("closed")
            reason = f" (it stopped on an error: {self.broken})" if self.broken else ""
            raise SchedulerClosedError(f"the scheduler is shutting down and admits no new request{reason}")
        if len(self._waiting) >= self.config.max_queued:
            self.metrics.rejected("queue_full")
            raise QueueFullError(f"the queue is full ({len(self._waiting)} requests waiting); retry later",
                                 self._retry_after())

    def _retry_after(self) -> float:
        """Seconds until the first running request is done (a place frees), at the measured rate."""
        if not self._running or self._pixels_per_second <= 0:
            return 1.0
        return max(1.0, min(r.remaining_work for r in self._running) / self._pixels_per_second)

    def stats(self) -> dict[str, int]:
        """Requests waiting and running, and the padded output pixels of the running ones."""
        with self._lock:
            return {"queued": len(self._waiting), "running": len(self._running),
                    "pixels_in_flight": sum(r.pixels for r in self._running)}

    def close(self, *, drain: bool = True, timeout: float | None = None) -> None:
        """Stop admitting; with `drain`, finish every accepted request, else fail them with
        SchedulerClosedError; then wait for the worker (at most `timeout` seconds)."""
        with self._wake:
            self._closed = True
            abandoned = [] if drain else self._waiting + self._running
            if not drain:
                self._waiting, self._running = [], []
            self._wake.notify()
        for request in abandoned:
            self._fail(request, SchedulerClosedError("the scheduler closed before this request was served"),
                       "closed")
        self._worker.join(timeout)

    @property
    def closed(self) -> bool:
        return self._closed

    def _serve(self) -> None:
        with torch.inference_mode():
            while True:
                try:
                    self._do_chores()
                    admitted, dropped, batch = self._next_batch()
                    for request, error, outcome in dropped:
                        self._fail(request, error, outcome)
                    for request in admitted:
                        self._start(request)
                    if batch is None:
                        return
                    if batch:
                        self._execute(batch)
                except BaseException as error:  # noqa: BLE001  (no future may wait on a dead worker)
                    logger.exception("the scheduler's worker stopped on an unexpected error")
                    self._break(error)
                    return

    def _do_chores(self) -> None:
        with self._lock:
            chores, self._chores = self._chores, []
        for chore, done in chores:
            try:
                chore()
            except Exception as error:  # noqa: BLE001  (its caller learns why)
                done.set_exception(error)
            else:
                done.set_result(None)

    def _break(self, error: BaseException) -> None:
        with self._wake:
            self.broken = " ".join(str(error).split()) or type(error).__name__
            self._closed = True
            abandoned, self._waiting, self._running = self._waiting + self._running, [], []
            chores, self._chores = self._chores, []
        for _, done in chores:
            done.set_exception(SchedulerClosedError(f"the scheduler stopped on an error: {self.broken}"))
        for request in abandoned:
            with contextlib.suppress(concurrent.futures.InvalidStateError):
                request.future.set_exception(SchedulerClosedError(f"the scheduler stopped on an error: {self.broken}"))

    def _next_batch(self) -> tuple[list[_Request], list[tuple[_Request, BaseException | None, str]],
                                   list[tuple[_Request, int]] | None]:
        """The requests just admitted (their state is built outside the lock), those dropped
        (cancelled or past their deadline) with why, and the next call's tiles as (request, tile
        index), in an order where every admitted request is built before it is picked: None once
        closed and drained."""
        with self._wake:
            while True:
                now = time.monotonic()
                dropped = self._drop_abandoned(now)
                admitted = self._admit(now)
                if admitted or self._chores:
                    return admitted, dropped, []
                if dropped or self._running:
                    return [], dropped, self._pick(now) if self._running else []
                if self._closed:
                    return [], [], None
                self._wake.wait()

    def _drop_abandoned(self, now: float) -> list[tuple[_Request, BaseException | None, str]]:
        dropped = []
        for queue in (self._waiting, self._running):
            for request in list(queue):
                if request.future.cancelled():
                    dropped.append((request, None, "cancelled"))
                elif request.deadline is not None and now > request.deadline:
                    dropped.append((request, DeadlineExceeded(
                        f"the deadline of {request.deadline - request.submitted:.3g} s passed at step "
                        f"{request.step + 1} of {request.num_steps}"), "deadline"))
                else:
                    continue
                queue.remove(request)
        return dropped

    def _admit(self, now: float) -> list[_Request]:
        in_flight = sum(r.pixels for r in self._running)
        admitted = []
        for request in list(self._waiting):
            if in_flight + request.pixels <= self.max_pixels_in_flight:
                self._waiting.remove(request)
                request.admitted = now
                self._running.append(request)
                admitted.append(request)
                in_flight += request.pixels
            elif now - request.submitted > self.config.aging:
                # It has waited long enough: nothing more passes it.
                break
        return admitted

    def _start(self, request: _Request) -> None:
        """Build an admitted request's condition, plan, initial state and tiles (the worker's
        thread, outside the lock); a failure fails the request alone."""
        engine = self.engine
        try:
            x_up = engine.condition(request.lr)
            request.crop = (request.lr.shape[-2] * engine.scale, request.lr.shape[-1] * engine.scale)
            x_up = pad_to(x_up, max(x_up.shape[-2], request.side), max(x_up.shape[-1], request.side))
            generator = torch.Generator().manual_seed(request.seed)
            plan, y_T = start_sampling(x_up, request.schedule, request.sampler, prediction=engine.prediction,
                                       residual_scale=engine.residual_scale, generator=generator)
            grid = fixed_grid(tuple(x_up.shape[-2:]), request.side,
                              default_overlap(request.side, engine.size_multiple), self.capacity[request.side])
            request.x_up, request.tiles_x, request.plan = x_up, x_up[0].to(engine.dtype), plan
            request.y = y_T.float()
            request.blender = TileBlender(grid, engine.device)
            request.noise = engine.backend.step_noise(generator)
            request.nonfinite = torch.zeros(plan.num_steps, dtype=torch.bool, device=engine.device)
            request.history = torch.zeros_like(request.y) if plan.multistep else None
            request.output = torch.zeros_like(request.y)
        except Exception as error:  # noqa: BLE001  (this request's failure, e.g. out of memory)
            self._remove(request)
            self._fail(request, error, "error")

    def _pick(self, now: float) -> list[tuple[_Request, int]]:
        def order(request: _Request) -> tuple:
            return (request.remaining_work / (1.0 + (now - request.submitted) / self.config.aging), request.seq)

        ranked = sorted(self._running, key=order)
        side = ranked[0].side
        capacity = self.capacity[side]
        batch: list[tuple[_Request, int]] = []
        for request in ranked:
            if request.side != side:
                continue
            for tile in range(request.next_tile, request.tiles_per_step):
                if len(batch) == capacity:
                    return batch
                batch.append((request, tile))
        return batch

    def _execute(self, batch: list[tuple[_Request, int]]) -> None:
        side = batch[0][0].side
        engine = self.engine
        started = time.perf_counter()
        try:
            x_tiles = torch.stack([r.blender.cut(r.tiles_x, r.blender.places[t]) for r, t in batch])
            y_tiles = torch.stack([r.blender.cut(r.y[0], r.blender.places[t]) for r, t in batch]).to(engine.dtype)
            levels = torch.tensor([float(r.plan.noise_level[r.step]) for r, _ in batch], dtype=torch.float32,
                                  device=engine.device)
            output = self._denoisers[side](x_tiles, y_tiles, levels)
            if tuple(output.shape) != tuple(y_tiles.shape):
                raise RuntimeError(f"the denoiser returned {tuple(output.shape)} for tiles of {tuple(y_tiles.shape)}")
            for k, (request, tile) in enumerate(batch):
                request.blender.add(request.output[0], request.blender.places[tile], output[k])
        except Exception as error:  # noqa: BLE001  (every request of the call learns why it failed)
            logger.exception("a denoiser call on %d tiles of %d pixels failed", len(batch), side)
            for request in dict.fromkeys(r for r, _ in batch):
                self._remove(request)
                self._fail(request, error, "error")
            return
        elapsed = time.perf_counter() - started
        rate = len(batch) * side * side / elapsed
        self._pixels_per_second = rate if self._pixels_per_second == 0 else 0.9 * self._pixels_per_second + 0.1 * rate
        self.metrics.denoiser_call(len(batch), side, elapsed)
        for request in dict.fromkeys(r for r, _ in batch):
            request.next_tile += sum(1 for r, _ in batch if r is request)
            if request.next_tile == request.tiles_per_step:
                self._advance(request)

    def _advance(self, request: _Request) -> None:
        """The posterior step of the request's current step, then its result if it was the last."""
        try:
            request.y = posterior_update(request.plan, request.step, request.y, request.output,
                                         noise=request.noise, nonfinite=request.nonfinite, history=request.history,
                                         backend=self.engine.backend.op_backend)
            request.output.zero_()
            request.step += 1
            request.next_tile = 0
            if request.step < request.plan.num_steps:
                return
            raise_if_nonfinite(request.nonfinite, request.plan)
            y0 = finish_sampling(request.y, request.x_up, self.engine.residual_scale)
            image = output_image(y0[0, :, :request.crop[0], :request.crop[1]]).cpu()
        except Exception as error:  # noqa: BLE001
            self._remove(request)
            self._fail(request, error, "error")
            return
        self._remove(request)
        done = time.monotonic()
        served = Served(image, request.seed, request.side, request.tiles_per_step,
                        queued=request.admitted - request.submitted, sampled=done - request.admitted)
        try:
            request.future.set_result(served)
        except concurrent.futures.InvalidStateError:  # cancelled by its caller meanwhile
            self.metrics.finished("cancelled", done - request.submitted, 0)
            return
        self.metrics.finished("ok", done - request.submitted, request.crop[0] * request.crop[1])

    def _remove(self, request: _Request) -> None:
        with self._lock:
            if request in self._running:
                self._running.remove(request)

    def _fail(self, request: _Request, error: BaseException | None, outcome: str) -> None:
        self.metrics.finished(outcome, time.monotonic() - request.submitted, 0)
        if error is None:
            return
        with contextlib.suppress(concurrent.futures.InvalidStateError):
            request.future.set_exception(error)
