"""The serving scheduler (serving/scheduler.py): tiles of many requests in one denoiser call, each
request's output its own, against `SR3Engine.sample` and tiled sampling on the same grid;
admission, fairness, deadlines, cancellation and shutdown."""

import dataclasses
import functools
import threading
import time

import pytest
import torch
import torch.nn as nn

import sr3_engine as sr3
from sr3_engine.diffusion import output_image, pad_to
from sr3_engine.runtime.tiling import default_overlap, fixed_grid
from sr3_engine.samplers import sample_with
from sr3_engine.serving.scheduler import (DeadlineExceeded, QueueFullError, RequestTooLargeError, Scheduler,
                                          SchedulerClosedError, SchedulerConfig)

TINY = sr3.UNetConfig.named("tiny")
SIDES = (24, 48)


def _engine(model, **kwargs):
    kwargs.setdefault("schedule", sr3.NoiseSchedule.linear(6, 1e-3, 0.2))
    kwargs.setdefault("scale", 2)
    kwargs.setdefault("sampler", sr3.SamplerConfig("ddim"))
    return sr3.SR3Engine(model, progress=False, **kwargs)


def _seeded(seed):
    return torch.Generator().manual_seed(seed)


class Recorder:
    """SchedulerMetrics that keeps what the scheduler reported."""

    def __init__(self):
        self.calls, self.outcomes, self.rejections = [], [], []

    def denoiser_call(self, tiles, tile_side, seconds):
        self.calls.append((tiles, tile_side))

    def finished(self, outcome, seconds, output_pixels):
        self.outcomes.append(outcome)

    def rejected(self, reason):
        self.rejections.append(reason)


class Gated(nn.Module):
    """A denoiser (no UNetConfig: eps, size multiple 1) that records every call's noise levels and
    blocks each call until `gate` is set, so a test can line requests up before the worker runs."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.gate = threading.Event()
        self.gate.set()
        self.levels = []

    def forward(self, x_up, y_t, noise_level):
        self.gate.wait(30)
        self.levels.append(noise_level.tolist())
        return self.inner(x_up, y_t, noise_level)


@pytest.fixture
def residual_model():
    torch.manual_seed(99)
    return sr3.SR3UNet(dataclasses.replace(TINY, prediction="v", residual_scale=4.0)).eval()


@pytest.mark.parametrize("sampler", [sr3.SamplerConfig("ancestral"), sr3.SamplerConfig("ddim", strength=0.5),
                                     sr3.SamplerConfig("dpmpp_2m"), sr3.SamplerConfig("mean")],
                         ids=["ancestral", "ddim-warm", "dpmpp_2m", "mean"])
@pytest.mark.parametrize("which", ["image-eps", "residual-v"])
def test_a_one_tile_request_is_what_engine_sample_gives_for_its_seed(tiny_model, residual_model, sampler, which):
    engine = _engine(tiny_model if which == "image-eps" else residual_model)
    lr = torch.rand(3, 12, 12)  # x2 = 24: exactly one tile of side 24
    with Scheduler(engine, SchedulerConfig(tile_sides=SIDES)) as scheduler:
        served = scheduler.submit(lr, sampler=sampler, seed=7).result(60)
    expected = engine.sample(lr[None], generator=_seeded(7), sampler=sampler)[0]
    assert served.seed == 7 and served.tile_side == 24 and served.tiles == 1
    torch.testing.assert_close(served.image, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("sampler", ["ancestral", "dpmpp_2m"])
def test_a_tiled_request_is_tiled_sampling_on_the_same_grid(tiny_model, sampler):
    # The reference: the engine backend's own tiled loop (TiledDenoiser + run_plan) on the grid
    # the scheduler chooses, padded as it pads.
    engine = _engine(tiny_model)
    lr = torch.rand(3, 40, 35)  # x2 = 80 x 70, padded to 80 x 72: 2 x 2 tiles of 48
    with Scheduler(engine, SchedulerConfig(tile_sides=SIDES, max_tiles_per_call=3)) as scheduler:
        served = scheduler.submit(lr, sampler=sampler, seed=3).result(60)
        side, count, _ = scheduler.tiling_for(80, 72)
    assert (served.tile_side, served.tiles) == (side, count) == (48, 4)
    x_up = engine.condition(lr[None])
    x_up = pad_to(x_up, max(x_up.shape[-2], side), max(x_up.shape[-1], side))
    grid = fixed_grid(tuple(x_up.shape[-2:]), side, default_overlap(side, engine.size_multiple), 2)
    y0 = sample_with(functools.partial(engine.backend.run, tiles=grid), x_up, engine.schedule,
                     engine.sampler_config(sampler), prediction=engine.prediction,
                     residual_scale=engine.residual_scale, generator=_seeded(3))
    expected = output_image(y0[0, :, :80, :70])
    assert served.image.shape == (3, 80, 70)
    torch.testing.assert_close(served.image, expected, rtol=0, atol=1e-5)


def test_an_image_smaller_than_its_tile_is_padded_to_it_and_cropped_back(tiny_model):
    engine = _engine(tiny_model)
    with Scheduler(engine, SchedulerConfig(tile_sides=SIDES)) as scheduler:
        assert scheduler.tiling_for(8, 20)[:2] == (24, 1)
        served = scheduler.submit(torch.rand(3, 4, 10), seed=1).result(60)
    assert served.image.shape == (3, 8, 20) and served.tile_side == 24


def test_the_tile_side_is_the_smallest_within_the_slack_of_the_fewest_denoised_pixels(tiny_model):
    from sr3_engine.serving.scheduler import TILE_SLACK

    engine = _engine(tiny_model)
    with Scheduler(engine, SchedulerConfig(tile_sides=(24, 48, 96))) as scheduler:
        chosen = {}
        for height, width in [(24, 24), (48, 48), (96, 96), (40, 200), (100, 100), (24, 400), (200, 200)]:
            side, count, _ = scheduler.tiling_for(height, width)
            costs = {}
            for candidate in (24, 48, 96):
                size = (max(height, candidate), max(width, candidate))
                costs[candidate] = fixed_grid(size, candidate, default_overlap(candidate, 4), 1).count * candidate ** 2
            assert costs[side] <= (1 + TILE_SLACK) * min(costs.values())
            assert side == min(s for s, c in costs.items() if c <= (1 + TILE_SLACK) * min(costs.values()))
            chosen[height, width] = side
    # An image of one tile's size is that tile, never padded into a larger one or cut into smaller ones.
    assert chosen[24, 24] == 24 and chosen[48, 48] == 48 and chosen[96, 96] == 96


def test_a_request_amid_others_gets_the_output_it_gets_alone(tiny_model):
    engine = _engine(tiny_model)
    lr = torch.rand(3, 30, 20)
    recorder = Recorder()
    config = SchedulerConfig(tile_sides=SIDES, max_tiles_per_call=4)
    with Scheduler(engine, config, metrics=recorder) as scheduler:
        alone = scheduler.submit(lr, sampler="dpmpp_2m", seed=11).result(60)
        others = [scheduler.submit(torch.rand(3, h, w), sampler=s, seed=i)
                  for i, (h, w, s) in enumerate([(12, 12, "ancestral"), (12, 10, "ddim"), (40, 31, "dpmpp_2m"),
                                                 (8, 12, "mean"), (12, 12, "ddim")] * 2)]
        amid = scheduler.submit(lr, sampler="dpmpp_2m", seed=11)
        results = [future.result(120) for future in others] + [amid.result(120)]
    torch.testing.assert_close(amid.result().image, alone.image, rtol=0, atol=1e-5)
    assert all(isinstance(r.image, torch.Tensor) for r in results)
    # Calls did carry tiles of several requests: more tiles than any one request has per step.
    assert max(tiles for tiles, side in recorder.calls if side == 24) > 1


def test_one_call_carries_tiles_at_different_noise_levels(tiny_model):
    gated = Gated(tiny_model)
    engine = _engine(gated)
    with Scheduler(engine, SchedulerConfig(tile_sides=(24,), max_tiles_per_call=2)) as scheduler:
        gated.gate.clear()
        first = scheduler.submit(torch.rand(3, 12, 12), seed=0)
        time.sleep(0.2)  # the worker now waits inside the first call, on the first request alone
        second = scheduler.submit(torch.rand(3, 12, 12), seed=1, sampler=sr3.SamplerConfig("ddim", strength=0.5))
        gated.gate.set()
        first.result(60), second.result(60)
    mixed = [levels for levels in gated.levels if len(levels) == 2]
    assert mixed and any(levels[0] != levels[1] for levels in mixed)


def test_a_small_request_is_not_stuck_behind_a_large_one(tiny_model):
    gated = Gated(tiny_model)
    engine = _engine(gated)
    recorder = Recorder()
    with Scheduler(engine, SchedulerConfig(tile_sides=(24,), max_tiles_per_call=1), metrics=recorder) as scheduler:
        gated.gate.clear()
        large = scheduler.submit(torch.rand(3, 60, 60), seed=0)  # 120 x 120: 36 tiles a step, 6 steps
        time.sleep(0.2)
        small = scheduler.submit(torch.rand(3, 12, 12), seed=1)
        calls_before_small = len(gated.levels)
        calls_until_done = []
        small.add_done_callback(lambda _: calls_until_done.append(len(gated.levels)))  # in the worker, at once
        gated.gate.set()
        small.result(60)
        calls_for_small = calls_until_done[0] - calls_before_small
        assert not large.done()
        large.result(120)
    # The call in progress when it came, then its own 6 steps: it waited for no step of the large one.
    assert calls_for_small <= 1 + 6


def test_no_request_starves_behind_a_stream_of_smaller_ones(tiny_model):
    engine = _engine(tiny_model)
    stop = threading.Event()
    with Scheduler(engine, SchedulerConfig(tile_sides=(24,), max_tiles_per_call=1, aging=0.05)) as scheduler:
        large = scheduler.submit(torch.rand(3, 24, 24), seed=0)  # 4 tiles a step: more work than any small one

        def stream():
            while not stop.is_set():
                futures = [scheduler.submit(torch.rand(3, 12, 12), seed=1) for _ in range(3)]
                for future in futures:
                    future.result(60)

        feeder = threading.Thread(target=stream)
        feeder.start()
        try:
            large.result(60)  # shortest-remaining-first alone would never serve it while smalls keep coming
        finally:
            stop.set()
            feeder.join()


def test_a_full_queue_refuses_at_once_with_a_retry_estimate(tiny_model):
    gated = Gated(tiny_model)
    engine = _engine(gated)
    recorder = Recorder()
    config = SchedulerConfig(tile_sides=(24,), max_queued=1, max_pixels_in_flight=24 * 24)
    with Scheduler(engine, config, metrics=recorder) as scheduler:
        gated.gate.clear()
        running = scheduler.submit(torch.rand(3, 12, 12), seed=0)
        time.sleep(0.2)
        waiting = scheduler.submit(torch.rand(3, 12, 12), seed=1)  # no pixels left: it waits
        with pytest.raises(QueueFullError, match="queue is full") as refused:
            scheduler.submit(torch.rand(3, 12, 12), seed=2)
        assert refused.value.retry_after >= 1
        with pytest.raises(RequestTooLargeError, match="pixels in flight"):
            scheduler.submit(torch.rand(3, 20, 20), seed=3)
        gated.gate.set()
        running.result(60), waiting.result(60)
    assert recorder.rejections == ["queue_full", "too_large"]


def test_a_passed_deadline_fails_the_request_and_frees_its_tiles(tiny_model):
    gated = Gated(tiny_model)
    engine = _engine(gated)
    recorder = Recorder()
    with Scheduler(engine, SchedulerConfig(tile_sides=(24,), max_tiles_per_call=4), metrics=recorder) as scheduler:
        gated.gate.clear()
        kept = scheduler.submit(torch.rand(3, 12, 12), seed=0)
        late = scheduler.submit(torch.rand(3, 12, 12), seed=1, deadline=0.1)
        time.sleep(0.3)
        gated.gate.set()
        with pytest.raises(DeadlineExceeded, match="deadline of 0.1 s passed"):
            late.result(60)
        kept.result(60)
    assert "deadline" in recorder.outcomes
    # After the call in progress, every call holds the one request left.
    assert all(tiles == 1 for tiles, _ in recorder.calls[1:])


def test_a_cancelled_request_leaves_at_the_next_call(tiny_model):
    gated = Gated(tiny_model)
    engine = _engine(gated)
    recorder = Recorder()
    with Scheduler(engine, SchedulerConfig(tile_sides=(24,), max_tiles_per_call=4), metrics=recorder) as scheduler:
        gated.gate.clear()
        kept = scheduler.submit(torch.rand(3, 12, 12), seed=0)
        dropped = scheduler.submit(torch.rand(3, 12, 12), seed=1)
        time.sleep(0.2)
        assert dropped.cancel()
        gated.gate.set()
        kept.result(60)
    assert dropped.cancelled() and "cancelled" in recorder.outcomes
    assert all(tiles == 1 for tiles, _ in recorder.calls[1:])


def test_close_finishes_what_was_accepted_and_refuses_the_rest(tiny_model):
    engine = _engine(tiny_model)
    scheduler = Scheduler(engine, SchedulerConfig(tile_sides=SIDES))
    accepted = [scheduler.submit(torch.rand(3, 12, 12), seed=i) for i in range(4)]
    scheduler.close()
    assert all(future.done() and future.exception() is None for future in accepted)
    with pytest.raises(SchedulerClosedError):
        scheduler.submit(torch.rand(3, 12, 12))


def test_close_without_draining_fails_what_is_left(tiny_model):
    gated = Gated(tiny_model)
    engine = _engine(gated)
    scheduler = Scheduler(engine, SchedulerConfig(tile_sides=(24,), max_tiles_per_call=1))
    gated.gate.clear()
    futures = [scheduler.submit(torch.rand(3, 12, 12), seed=i) for i in range(3)]
    time.sleep(0.2)
    closer = threading.Thread(target=scheduler.close, kwargs={"drain": False})
    closer.start()
    time.sleep(0.1)
    gated.gate.set()
    closer.join(30)
    assert sum(isinstance(f.exception(30), SchedulerClosedError) for f in futures) >= 2


@pytest.mark.parametrize("kwargs, match", [
    ({"image": torch.rand(2, 3, 8, 8)}, "one image at a time"),
    ({"image": torch.rand(4, 8, 8)}, "3 \\(RGB\\) channels"),
    ({"image": torch.rand(3, 8, 8) + 1}, "values in \\[0, 1\\]"),
    ({"seed": -1}, "seed must be"),
    ({"seed": 2**63}, "seed must be"),
    ({"deadline": 0.0}, "deadline must be"),
    ({"strength": 1.5}, "strength must be"),
    ({"sampler": "nope"}, "name must be one of"),
])
def test_bad_requests_are_refused_in_one_line(tiny_model, kwargs, match):
    engine = _engine(tiny_model)
    kwargs = {"image": torch.rand(3, 8, 8), **kwargs}
    with Scheduler(engine, SchedulerConfig(tile_sides=SIDES)) as scheduler:
        with pytest.raises(ValueError, match=match) as refused:
            scheduler.submit(kwargs.pop("image"), **kwargs)
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("config, match", [
    (dict(tile_sides=()), "tile_sides"), (dict(tile_sides=(0,)), "tile_sides"),
    (dict(max_tiles_per_call=0), "max_tiles_per_call"), (dict(max_queued=0), "max_queued"),
    (dict(aging=0), "aging"), (dict(max_pixels_in_flight=True), "max_pixels_in_flight"),
])
def test_bad_scheduler_settings_are_refused(config, match):
    with pytest.raises(ValueError, match=match):
        SchedulerConfig(**config)


def test_a_tile_side_the_model_cannot_take_is_refused(tiny_model):
    with pytest.raises(ValueError, match="multiple of the model's size multiple 4"):
        Scheduler(_engine(tiny_model), SchedulerConfig(tile_sides=(30,)))


def test_the_default_tiles_fit_the_memory_budget(tiny_model):
    from sr3_engine.runtime.tiling import working_bytes

    for budget in (2**30, 64 * 2**20, 40 * 2**20):
        with Scheduler(_engine(tiny_model, max_memory=budget)) as scheduler:
            sides = scheduler.tile_sides
            bases = [side for side in sides if side + default_overlap(side, 4) in sides]
            assert len(sides) == 2 * len(bases) and max(bases) <= 256
            for side in sides:
                assert side % 4 == 0 and working_bytes(TINY, scheduler.capacity[side], side, side, 4) <= budget
        if budget == 2**30:
            assert sides == (64, 72, 128, 136, 256, 272)
    with pytest.raises(sr3.MemoryBudgetError, match="the budget is 8 MiB"):
        Scheduler(_engine(tiny_model, max_memory=8 * 2**20))


@pytest.mark.parametrize("backend, options", [
    ("fused", {}), ("compile", {"compiler": "aot_eager"}), ("onnxruntime", {})])
def test_every_backend_that_denoises_tiles_serves_requests(tiny_model, backend, options):
    pytest.importorskip("onnxruntime") if backend == "onnxruntime" else None
    reference = _engine(sr3.SR3UNet(TINY).eval())
    reference.model.load_state_dict(tiny_model.state_dict())
    engine = _engine(tiny_model, backend=backend, backend_options=options)
    with Scheduler(engine, SchedulerConfig(tile_sides=SIDES, max_tiles_per_call=3)) as scheduler:
        futures = [scheduler.submit(torch.rand(3, 12, 12, generator=_seeded(i)), seed=i, sampler="ancestral")
                   for i in range(4)]
        served = [future.result(120) for future in futures]
    for i, result in enumerate(served):
        expected = reference.sample(torch.rand(3, 12, 12, generator=_seeded(i))[None], generator=_seeded(i),
                                    sampler="ancestral")[0]
        torch.testing.assert_close(result.image, expected, rtol=0, atol=1e-4)


def test_a_failing_denoiser_call_fails_its_requests_and_the_scheduler_goes_on(tiny_model):
    gated = Gated(tiny_model)
    engine = _engine(gated)
    calls = []

    def forward(x_up, y_t, noise_level):
        calls.append(len(noise_level))
        if len(calls) == 1:
            raise RuntimeError("out of memory (simulated)")
        return tiny_model(x_up, y_t, noise_level)

    gated.forward = forward
    with Scheduler(engine, SchedulerConfig(tile_sides=(24,), max_tiles_per_call=1)) as scheduler:
        first = scheduler.submit(torch.rand(3, 12, 12), seed=0)
        with pytest.raises(RuntimeError, match="simulated"):
            first.result(60)
        assert scheduler.submit(torch.rand(3, 12, 12), seed=1).result(60).image.shape == (3, 24, 24)
        assert not scheduler.closed


def test_an_error_outside_any_request_fails_every_future_and_closes_the_scheduler(tiny_model):
    class Exploding(Recorder):
        def denoiser_call(self, tiles, tile_side, seconds):
            raise ValueError("a broken metrics sink")

    gated = Gated(tiny_model)
    engine = _engine(gated)
    scheduler = Scheduler(engine, SchedulerConfig(tile_sides=(24,), max_tiles_per_call=1), metrics=Exploding())
    gated.gate.clear()
    futures = [scheduler.submit(torch.rand(3, 12, 12), seed=i) for i in range(3)]
    gated.gate.set()
    for future in futures:
        with pytest.raises(SchedulerClosedError, match="broken metrics sink"):
            future.result(60)
    assert scheduler.closed and "broken metrics sink" in scheduler.broken
    with pytest.raises(SchedulerClosedError, match="stopped on an error"):
        scheduler.submit(torch.rand(3, 12, 12))
    scheduler.close()


def test_a_request_waiting_for_admission_holds_no_sampling_state(tiny_model, monkeypatch):
    gated = Gated(tiny_model)
    engine = _engine(gated)
    built = []
    condition = engine.condition
    monkeypatch.setattr(engine, "condition", lambda lr: built.append(lr.shape) or condition(lr))
    config = SchedulerConfig(tile_sides=(24,), max_pixels_in_flight=24 * 24)
    with Scheduler(engine, config) as scheduler:
        gated.gate.clear()
        futures = [scheduler.submit(torch.rand(3, 12, 12), seed=i) for i in range(3)]
        time.sleep(0.3)
        assert len(built) == 1  # only the admitted one has a condition, a state and tiles
        gated.gate.set()
        for future in futures:
            future.result(60)
    assert len(built) == 3


def test_a_request_that_waited_goes_before_fresh_smaller_ones(tiny_model):
    # Aged shortest-remaining-first: work / (1 + waited / aging). The large one (4 tiles a step,
    # 6 steps) waits 2 s behind a call; then it counts 24 / 11 tiles against a fresh small one's 5
    # (a 5-step schedule, whose levels differ), so its first step's 4 tiles run before the small one's.
    gated = Gated(tiny_model)
    engine = _engine(gated)
    config = SchedulerConfig(tile_sides=(24,), max_tiles_per_call=1, aging=0.2)
    with Scheduler(engine, config) as scheduler:
        gated.gate.clear()
        blocker = scheduler.submit(torch.rand(3, 12, 12), seed=9, sampler=sr3.SamplerConfig("mean"))
        time.sleep(0.2)
        large = scheduler.submit(torch.rand(3, 20, 20), seed=0)  # 40 x 40: 2 x 2 tiles of 24
        time.sleep(2.0)
        small = scheduler.submit(torch.rand(3, 12, 12), seed=1, steps=5)
        gated.gate.set()
        blocker.result(60), large.result(60), small.result(60)
    large_first_level = gated.levels[1][0]
    assert [levels[0] for levels in gated.levels[1:5]] == [large_first_level] * 4
