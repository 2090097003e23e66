"""The fused backend: the whole sampling loop as one CUDA graph, on fused kernels.

On CUDA the model runs in the engine's dtype (bf16 or fp16 recommended) and channels_last,
every GroupNorm+SiLU on the Triton kernel, every update on the fused posterior step, and
the loop of `plan.num_steps` denoiser calls is captured once per (batch, height, width,
dtype, plan) into a CUDA graph with static buffers, then replayed: a step costs its kernels
and no Python or launch overhead. Noise is drawn inside the posterior kernel from a seed
held in a device tensor, so replays with a new seed need no re-capture and no noise tensor
exists; the seed comes from the caller's generator, so the same generator seed gives the
same image. `in_kernel_noise=False` instead draws the noise of every step from the
generator as the eager backend does (same numbers, more memory), for parity checks.
At most `max_graphs` graphs are kept, least recently used first out. The captured loop is
`samplers.run_steps`, the eager loop itself, traced once; every tensor a replay reads or
writes (inputs, per-step noise levels, seed, noise, flags, output) is owned by the
`_CapturedLoop` that holds the graph, so nothing it reads can be freed and reused.
Only an op backend whose posterior step reads a device seed (`triton`) can serve the
in-kernel noise of a captured loop; another one is refused at construction with the reason.

Tiled (a `TileGrid` from the engine), the loop runs step by step and what is captured is one
denoiser call on a batch of tiles, once per (tiles per call, tile height, tile width, dtype):
the last, smaller batch of tiles is padded to that size, so a new image size reuses the
graph. The posterior step runs on the whole image, its noise drawn in the kernel from one
seed for the whole image (or from the generator with `in_kernel_noise=False`).

On the CPU there are no CUDA graphs: the model runs channels_last on whatever fused ops exist
there (the C++ extension when built), traced once per (input shapes, dtypes) of a denoiser
call into frozen TorchScript graphs that the eager loop calls (`_FrozenDenoiser`, kept under
the same `max_graphs` bound; the trace is made in the second call of a shape, so a shape seen
once is not traced), and the backend says so once. A call's batch runs in ceil(batch /
`images_per_call`) near-equal slices, so that the feature maps of a slice stay in the cache:
at batch 4 the bundled demo-x4 model at 256x256 (8 MiB a map in float32) waits on memory, and
four calls of one image each were 1.36x faster than one call of four on 2 cores (32 MiB L3).
`slice_bytes` bounds one full-resolution feature map of a slice, inner_channels x
channel_mults[0] x height x width values. Its default, 4 MiB, picked the fastest slice
measured for the tiny config and demo-x4 at 32 to 256 pixels a side, or one within 3% of it
(demo-x4 at 128x128: 2 images a call where 4 were 3% faster, 8 were 10% slower). A model
without a `UNetConfig` runs every batch whole, as does `slice_bytes=None`. Tiled, every call
on a batch of tiles counts toward the trace, so a one-step plan is traced once two calls of a
step share a shape. The graphs run the same operators as the module, so the output is the
module's (to float32 rounding, which the slice size can change), but without Python and
module-call overhead between them: on 2 cores that made a denoiser call of the tiny config
at batch 1 1.6-2x faster and one of demo-x4 at 256x256 about 14% faster. Weights are frozen
into the graphs, so the model must not change once the engine has sampled. TorchScript is
deprecated by PyTorch; what replaces it measured slower here (torch.export's module: no gain
over eager; Inductor with its C++ wrapper and frozen weights: 8.7 ms a call against 5.9 ms,
after 47 s of compiling; with frozen weights on demo-x4 at 256x256, 363 ms against 354).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import logging
import warnings
from typing import Callable

import torch
import torch.nn as nn

from ... import ops
from ...config import UNetConfig
from ...diffusion import generator_device, randn
from ...samplers import (Denoiser, GeneratorNoise, GivenNoise, NoiseSource, SamplingPlan, SeededNoise, StepCallback,
                         level_tensors, raise_if_nonfinite, run_steps)
from ...unet import set_op_backend
from ..tiling import TileGrid, TiledDenoiser
from .base import BackendUnavailableError, run_eagerly

logger = logging.getLogger(__name__)

# The largest full-resolution feature map of a slice of a CPU call (see the module docstring).
DEFAULT_SLICE_BYTES = 4 << 20


@dataclasses.dataclass(frozen=True, eq=False)
class _CapturedLoop:
    """A captured sampling loop and every buffer its replays read or write."""

    graph: torch.cuda.CUDAGraph
    x_up: torch.Tensor
    y: torch.Tensor
    levels: list[torch.Tensor]
    seed: torch.Tensor
    noise: torch.Tensor | None
    nonfinite: torch.Tensor
    out: torch.Tensor


@dataclasses.dataclass(frozen=True, eq=False)
class _CapturedDenoiser:
    """One captured denoiser call on a fixed batch of tiles, and its buffers."""

    graph: torch.cuda.CUDAGraph
    x_up: torch.Tensor
    y: torch.Tensor
    level: torch.Tensor
    out: torch.Tensor


_DenoiserInputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class _FrozenDenoiser:
    """The model for one set of denoiser-call input shapes and dtypes on the CPU, applied to the
    call's slices (of at most two sizes): run as it is in the first call, traced and frozen in
    the second (a graph per slice size), the frozen graphs in every later one. A shape seen
    once (a one-step plan such as "mean", a last odd-sized batch) never pays for a trace that
    costs more than the call itself (about 1.2 s against 0.6 s for demo-x4 at 256x256)."""

    def __init__(self, model: nn.Module):
        self._model = model
        self._called = False
        self._graphs: dict[int, torch.jit.ScriptModule] = {}

    def __call__(self, slices: list[_DenoiserInputs]) -> torch.Tensor:
        """eps of the whole call: of each slice, in order, concatenated."""
        if self._called and not self._graphs:
            for inputs in slices:
                if len(inputs[0]) not in self._graphs:
                    self._graphs[len(inputs[0])] = _freeze(self._model, *inputs)
        self._called = True
        eps = [self._graphs.get(len(inputs[0]), self._model)(*inputs) for inputs in slices]
        return eps[0] if len(eps) == 1 else torch.cat(eps)


def _freeze(model: nn.Module, x_up: torch.Tensor, y_t: torch.Tensor, noise_level: torch.Tensor
            ) -> torch.jit.ScriptModule:
    # Traced outside inference mode (the trace records ordinary tensors), on copies of the
    # caller's tensors, which may be inference tensors.
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        # The shape checks in forward become constants of the trace, which is what is wanted:
        # every trace serves exactly the shapes it was made for. torch.jit's own deprecation
        # notice is answered in the module docstring.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        examples = tuple(t.clone() for t in (x_up, y_t, noise_level))
        traced = torch.jit.trace(model, examples, check_trace=False)
        return torch.jit.freeze(traced.eval())


class FusedBackend:
    name = "fused"
    tile_limits = (None, None)
    bf16_devices = ("cpu", "cuda")

    def __init__(self, model: nn.Module, device: torch.device, dtype: torch.dtype, op_backend: str = "auto", *,
                 max_graphs: int = 4, in_kernel_noise: bool = True, slice_bytes: int | None = DEFAULT_SLICE_BYTES):
        if max_graphs < 1:
            raise ValueError(f"fused backend: max_graphs must be positive; got {max_graphs}")
        if slice_bytes is not None and (isinstance(slice_bytes, bool) or not isinstance(slice_bytes, int)
                                        or slice_bytes < 1):
            raise ValueError(f"fused backend: slice_bytes must be a positive int or None; got {slice_bytes!r}")
        self.device, self.dtype = device, dtype
        self.max_graphs, self.in_kernel_noise, self.slice_bytes = max_graphs, in_kernel_noise, slice_bytes
        if device.type == "cuda":
            self.op_backend = "triton" if op_backend == "auto" else op_backend
            reason = ops.why_no_device_seed(self.op_backend, device) if in_kernel_noise else None
            if reason is not None:
                raise BackendUnavailableError(f"engine backend 'fused' cannot capture op backend "
                                              f"{self.op_backend!r} with in-kernel noise: {reason} (or pass "
                                              "backend_options={'in_kernel_noise': False})")
            probe = torch.empty(1, 8, 1, 1, device=device, dtype=dtype)
            for op in ("group_norm_silu", "posterior_step"):
                reason = ops.why_unavailable(op, self.op_backend, probe)
                if reason is not None:
                    raise BackendUnavailableError(f"engine backend 'fused' needs {op} on {self.op_backend}: {reason}")
        else:
            probe = torch.empty(1, 8, 1, 1, device=device, dtype=dtype)
            self.op_backend = op_backend
            logger.info("engine backend 'fused' on %s: no CUDA graphs; the model runs as frozen TorchScript, "
                        "GroupNorm+SiLU on %s, the posterior step on %s", device.type,
                        ops.resolve_backend("group_norm_silu", op_backend, probe),
                        ops.resolve_backend("posterior_step", op_backend, probe))
        self.model = model.to(device=device, dtype=dtype, memory_format=torch.channels_last).eval()
        set_op_backend(self.model, self.op_backend)
        self._graphs: collections.OrderedDict[tuple, _CapturedLoop | _CapturedDenoiser | _FrozenDenoiser] = (
            collections.OrderedDict())

    @property
    def cached_graphs(self) -> int:
        return len(self._graphs)

    def release_graphs(self) -> None:
        """Drop every captured graph (on the CPU, every frozen module); their memory pools go back to
        PyTorch's allocator, and the next call of each shape captures again."""
        self._graphs.clear()

    def denoise(self, x_up: torch.Tensor, y_t: torch.Tensor, noise_level: torch.Tensor) -> torch.Tensor:
        return self.model(x_up, y_t.contiguous(memory_format=torch.channels_last), noise_level)

    def run(self, x_up: torch.Tensor, y_T: torch.Tensor, plan: SamplingPlan, *,
            generator: torch.Generator | None, callback: StepCallback | None,
            tiles: TileGrid | None = None) -> torch.Tensor:
        x_up = x_up.to(self.dtype).contiguous(memory_format=torch.channels_last)
        if self.device.type != "cuda":
            return run_eagerly(self._frozen_denoise, self.device, x_up, y_T, plan, generator=generator,
                               callback=callback, tiles=tiles, op_backend=self.op_backend)
        if tiles is not None:
            return self._run_tiled(x_up, y_T, plan, tiles, generator=generator, callback=callback)
        loop = self._loop_for(x_up, plan)
        loop.x_up.copy_(x_up)
        loop.y.copy_(y_T)
        if loop.noise is None:
            loop.seed.fill_(_draw_seed(generator))
        else:
            for i in range(plan.num_steps):
                if plan.sigma[i] != 0.0:
                    loop.noise[i].copy_(randn(tuple(y_T.shape), generator, self.device))
        with torch.cuda.device(self.device):
            loop.graph.replay()
        raise_if_nonfinite(loop.nonfinite, plan)
        y0 = loop.out.clone()
        if callback is not None:
            # The graph runs every step at once; the callback hears of each one after it.
            for i in range(plan.num_steps):
                callback(i, plan.num_steps, y0)
        return y0

    def step_noise(self, generator: torch.Generator | None) -> NoiseSource:
        """On CUDA with in-kernel noise, a seed drawn from `generator` that the posterior kernel
        reads (what the captured loop and the tiled loop draw); else the generator's own noise."""
        if self.device.type == "cuda" and self.in_kernel_noise:
            return SeededNoise(_draw_seed(generator))
        return GeneratorNoise(generator)

    def tile_denoiser(self, capacity: int) -> Denoiser:
        """On the CPU the frozen graphs of each batch shape; on CUDA the graph captured for
        `capacity` tiles of a shape, replayed on every batch of that shape (a smaller one is
        padded), so that one graph serves a tile shape whatever the batch."""
        if self.device.type != "cuda":
            def frozen(x_up: torch.Tensor, y_t: torch.Tensor, noise_level: torch.Tensor) -> torch.Tensor:
                return self._frozen_denoise(x_up.contiguous(memory_format=torch.channels_last), y_t, noise_level)
            return frozen

        def graphed(x_up: torch.Tensor, y_t: torch.Tensor, noise_level: torch.Tensor) -> torch.Tensor:
            # The graphs' static buffers must be ordinary tensors, made outside inference mode.
            with torch.inference_mode(False), torch.no_grad(), torch.cuda.device(self.device):
                return self._graphed_denoise(capacity, x_up, y_t, noise_level)
        return graphed

    def images_per_call(self, height: int, width: int) -> int | None:
        """How many images one denoiser call of the model takes on the CPU, for inputs of `height`
        x `width` (the output size padded to the model's size multiple, or the tile size when
        tiled): as many as keep a full-resolution feature map within `slice_bytes`, at least one.
        None: whole batches (on CUDA, with `slice_bytes=None`, or for a model without a UNetConfig)."""
        config = getattr(self.model, "config", None)
        if self.device.type == "cuda" or self.slice_bytes is None or not isinstance(config, UNetConfig):
            return None
        map_bytes = config.inner_channels * max(1, config.channel_mults[0]) * height * width * self.dtype.itemsize
        return max(1, self.slice_bytes // map_bytes)

    def _frozen_denoise(self, x_up: torch.Tensor, y_t: torch.Tensor, noise_level: torch.Tensor) -> torch.Tensor:
        y_t = y_t.contiguous(memory_format=torch.channels_last)
        inputs = (x_up, y_t, noise_level)
        key = ("frozen",) + tuple((tuple(t.shape), t.dtype) for t in inputs)
        per_call = self.images_per_call(*x_up.shape[-2:])
        if per_call is None or x_up.shape[0] <= per_call:
            slices = [inputs]
        else:
            # tensor_split: the larger slices first, of at most two sizes.
            slices = list(zip(*(t.tensor_split(-(-x_up.shape[0] // per_call)) for t in inputs)))
        return self._cached(key, lambda: _FrozenDenoiser(self.model))(slices)

    def _run_tiled(self, x_up: torch.Tensor, y_T: torch.Tensor, plan: SamplingPlan, tiles: TileGrid, *,
                   generator: torch.Generator | None, callback: StepCallback | None) -> torch.Tensor:
        noise = self.step_noise(generator)
        denoise = TiledDenoiser(functools.partial(self._graphed_denoise, tiles.tiles_per_call), tiles, self.device)
        nonfinite = torch.zeros(plan.num_steps, dtype=torch.bool, device=self.device)
        # no_grad, not inference_mode: the graphs' static buffers must stay ordinary tensors.
        with torch.no_grad(), torch.cuda.device(self.device):
            y0 = run_steps(denoise, x_up, y_T, plan, noise=noise, nonfinite=nonfinite, callback=callback,
                           backend=self.op_backend)
        raise_if_nonfinite(nonfinite, plan)
        return y0

    def _graphed_denoise(self, capacity: int, x_up: torch.Tensor, y_t: torch.Tensor,
                         noise_level: torch.Tensor) -> torch.Tensor:
        """eps of up to `capacity` tiles through the graph captured for `capacity` tiles; the
        result is the graph's output buffer, valid until the next call."""
        count = x_up.shape[0]
        key = ("denoiser", capacity, tuple(x_up.shape[1:]), self.dtype)
        captured = self._cached(key, lambda: self._capture_denoiser(capacity, tuple(x_up.shape[1:])))
        captured.x_up[:count].copy_(x_up)
        captured.y[:count].copy_(y_t)
        captured.level[:count].copy_(noise_level)
        captured.graph.replay()
        return captured.out[:count]

    def _capture_denoiser(self, capacity: int, shape: tuple[int, ...]) -> _CapturedDenoiser:
        static_x = torch.zeros((capacity, *shape), device=self.device, dtype=self.dtype)
        static_x = static_x.contiguous(memory_format=torch.channels_last)
        static_y = torch.zeros_like(static_x)
        level = torch.zeros(capacity, device=self.device, dtype=torch.float32)
        with torch.no_grad():
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                self.denoise(static_x, static_y, level)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=torch.cuda.Stream(self.device)):
                out = self.denoise(static_x, static_y, level)
        return _CapturedDenoiser(graph, static_x, static_y, level, out)

    def _cached(self, key: tuple, build: Callable[[], _CapturedLoop | _CapturedDenoiser | _FrozenDenoiser]
                ) -> _CapturedLoop | _CapturedDenoiser | _FrozenDenoiser:
        """The graph kept under `key` (now the most recently used), or `build()`'s, kept in its place;
        beyond `max_graphs` the least recently used graph is dropped."""
        entry = self._graphs.get(key)
        if entry is not None:
            self._graphs.move_to_end(key)
            return entry
        entry = self._graphs[key] = build()
        if len(self._graphs) > self.max_graphs:
            self._graphs.popitem(last=False)
        return entry

    def _loop_for(self, x_up: torch.Tensor, plan: SamplingPlan) -> _CapturedLoop:
        key = (tuple(x_up.shape), self.dtype, _plan_digest(plan))
        return self._cached(key, lambda: self._capture(x_up, plan))

    def _capture(self, x_up: torch.Tensor, plan: SamplingPlan) -> _CapturedLoop:
        shape = tuple(x_up.shape)
        with torch.cuda.device(self.device):
            static_x = torch.zeros_like(x_up)
            static_y = torch.zeros(shape, device=self.device, dtype=torch.float32)
            levels = level_tensors(plan, shape[0], self.device)
            seed = torch.zeros((), device=self.device, dtype=torch.int64)
            noise_buffer = None if self.in_kernel_noise else torch.zeros((plan.num_steps, *shape), device=self.device)
            noise = SeededNoise(seed) if noise_buffer is None else GivenNoise(noise_buffer)
            nonfinite = torch.zeros(plan.num_steps, device=self.device, dtype=torch.bool)

            def loop(steps) -> torch.Tensor:
                return run_steps(self.denoise, static_x, static_y, plan, noise=noise, nonfinite=nonfinite,
                                 levels=levels, steps=steps, backend=self.op_backend)

            with torch.no_grad():
                # Warm-up off the capture stream compiles every kernel the loop uses (the first
                # step draws noise, the last does not) so that capture records launches only.
                side = torch.cuda.Stream(self.device)
                side.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(side):
                    loop(sorted({0, plan.num_steps - 1}))
                torch.cuda.current_stream(self.device).wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=torch.cuda.Stream(self.device)):
                    out = loop(range(plan.num_steps))
        return _CapturedLoop(graph, static_x, static_y, levels, seed, noise_buffer, nonfinite, out)


def _draw_seed(generator: torch.Generator | None) -> int:
    """The in-kernel noise seed of one run, drawn from the caller's generator."""
    return int(torch.randint(0, 2**62, (), generator=generator, device=generator_device(generator)))


def _plan_digest(plan: SamplingPlan) -> str:
    digest = hashlib.sha256()
    for array in (plan.noise_level, plan.state_coef, plan.output_coef, plan.coef1, plan.coef2,
                  plan.sigma, plan.extrapolation):
        digest.update(array.tobytes())
    digest.update(bytes([plan.clip]))
    return digest.hexdigest()
