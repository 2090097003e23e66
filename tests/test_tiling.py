"""Tiled sampling (runtime/tiling.py): the grid, the blend, the budget, and no seams."""

import copy

import pytest
import torch

import sr3_engine as sr3
from sr3_engine.runtime import tiling
from sr3_engine.unet import activation_bytes

TINY = sr3.UNetConfig.named("tiny")


def _engine(model, **kwargs):
    kwargs.setdefault("schedule", sr3.NoiseSchedule.linear(6, 1e-3, 0.2))
    kwargs.setdefault("scale", 2)
    kwargs.setdefault("sampler", sr3.SamplerConfig("ddim"))
    return sr3.SR3Engine(model, progress=False, **kwargs)


def _seeded(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("size, tile, overlap", [((80, 80), (32, 32), 8), ((24, 100), (24, 36), 12),
                                                  ((64, 40), (16, 40), 4), ((33, 70), (33, 20), 0)])
def test_the_windows_are_a_partition_of_unity(size, tile, overlap):
    starts = tuple(tiling.axis_starts(length, side, overlap) for length, side in zip(size, tile))
    grid = tiling.TileGrid(size, tile, overlap, starts, tiles_per_call=1)
    total = torch.zeros(size, dtype=torch.float64)
    rows, columns = grid.windows(0, torch.device("cpu")), grid.windows(1, torch.device("cpu"))
    for r, top in enumerate(starts[0]):
        for c, left in enumerate(starts[1]):
            assert top + tile[0] <= size[0] and left + tile[1] <= size[1]
            total[top:top + tile[0], left:left + tile[1]] += (rows[r][:, None] * columns[c][None, :]).double()
    torch.testing.assert_close(total, torch.ones(size, dtype=torch.float64), rtol=0, atol=1e-6)
    for axis in range(2):  # consecutive tiles overlap by at least `overlap`
        ends = [start + tile[axis] for start in starts[axis]]
        assert all(end - following >= overlap for end, following in zip(ends, starts[axis][1:]))


def test_a_pointwise_denoiser_gives_the_same_eps_tiled():
    # Without spatial context every tile computes exactly what the whole image would.
    def pointwise(x_up, y_t, level):
        return torch.tanh(3 * x_up) * y_t + level.view(-1, 1, 1, 1)

    x_up, y_t, level = torch.randn(2, 3, 48, 40), torch.randn(2, 3, 48, 40), torch.rand(2)
    grid = tiling.plan_tiles(None, 2, (48, 40), 4, 2**30, tile=16, overlap=4, multiple=4)
    tiled = tiling.TiledDenoiser(pointwise, grid, torch.device("cpu"))(x_up, y_t, level)
    torch.testing.assert_close(tiled, pointwise(x_up, y_t, level), rtol=1e-6, atol=1e-6)


def test_the_denoiser_sees_tiles_of_one_size_in_bounded_batches(tiny_model):
    shapes = []

    def recording(x_up, y_t, level):
        shapes.append((tuple(x_up.shape), tuple(level.shape)))
        return tiny_model(x_up, y_t, level)

    grid = tiling.plan_tiles(TINY, 2, (56, 72), 4, 2**30, tile=24, overlap=8, multiple=4)
    grid = tiling.TileGrid(grid.size, grid.tile, grid.overlap, grid.starts, tiles_per_call=5)
    with torch.no_grad():
        tiling.TiledDenoiser(recording, grid, torch.device("cpu"))(
            torch.rand(2, 3, 56, 72), torch.rand(2, 3, 56, 72), torch.rand(2))
    assert {shape[1:] for (shape, _) in shapes} == {(3, 24, 24)}
    assert [shape[0] for shape, _ in shapes] == [5] * (2 * grid.count // 5) + [2 * grid.count % 5]
    assert all(levels == (shape[0],) for shape, levels in shapes)


def test_the_same_seed_gives_the_same_output_whatever_the_tile_batch(tiny_model):
    engine = _engine(tiny_model)
    lr = torch.rand(2, 3, 36, 28)
    x_up = sr3.condition(lr, 2, 4)
    outputs = []
    for per_call in (1, 3, 100):
        grid = engine.tile_grid(2, tuple(x_up.shape[-2:]), tile=32, tile_overlap=8)
        grid = tiling.TileGrid(grid.size, grid.tile, grid.overlap, grid.starts, tiles_per_call=per_call)
        plan = sr3.make_plan(engine.schedule, sr3.SamplerConfig("ancestral"))
        y_T = torch.randn(x_up.shape, generator=_seeded(5))
        outputs.append(engine.backend.run(x_up, y_T, plan, generator=_seeded(6), callback=None, tiles=grid))
    for other in outputs[1:]:
        torch.testing.assert_close(other, outputs[0], rtol=1e-5, atol=1e-5)


def test_automatic_tiling_starts_only_when_the_whole_image_does_not_fit(tiny_model):
    lr = torch.rand(1, 3, 40, 48)
    roomy = _engine(tiny_model, max_memory=2**30)
    assert roomy.tile_grid(1, (80, 96)) is None
    whole_bytes = tiling.working_bytes(TINY, 1, 80, 96, 4)
    tight = _engine(tiny_model, max_memory=whole_bytes - 1)
    grid = tight.tile_grid(1, (80, 96))
    assert grid is not None and grid.count > 1
    assert tiling.working_bytes(TINY, grid.tiles_per_call, *grid.tile, 4) <= whole_bytes - 1
    untiled = roomy.sample(lr, generator=_seeded(1))
    torch.testing.assert_close(untiled, roomy.sample(lr, generator=_seeded(1), tile=None), rtol=0, atol=0)
    tiled = tight.sample(lr, generator=_seeded(1))
    assert tiled.shape == untiled.shape == (1, 3, 80, 96)
    # Tiles see less context than the whole image, so the two differ, but not by much on average.
    assert 0 < (tiled - untiled).abs().mean() < 0.1


def test_an_image_that_cannot_fit_even_tiled_says_so(tiny_model):
    engine = _engine(tiny_model, max_memory=2**20)
    with pytest.raises(tiling.MemoryBudgetError, match="MiB of working memory; the budget is 1 MiB"):
        engine.sample(torch.rand(1, 3, 64, 64))


def test_backend_limits_bound_the_tiles():
    grid = tiling.plan_tiles(TINY, 3, (200, 120), 4, 2**30, multiple=4, max_tiles_per_call=2, max_side=64)
    assert max(grid.tile) <= 64 and grid.tiles_per_call == 2


@pytest.mark.parametrize("tile, size", [(16, (40, 40)), (32, (24, 24)), (8, (16, 24))])
def test_a_forced_small_tile_gets_an_overlap_it_can_hold(tile, size):
    grid = tiling.plan_tiles(TINY, 1, size, 4, 2**30, tile=tile, multiple=4)
    assert max(grid.tile) <= tile and 0 <= grid.overlap < min(grid.tile) / 2 or grid.count == 1


def test_a_forced_tile_stays_within_the_backends_largest_side():
    grid = tiling.plan_tiles(TINY, 1, (256, 256), 4, 2**30, tile=128, multiple=4, max_side=64)
    assert max(grid.tile) <= 64


def test_the_activation_estimate_grows_with_batch_and_pixels():
    one = activation_bytes(TINY, 1, 64, 64, 4)
    assert activation_bytes(TINY, 3, 64, 64, 4) == 3 * one
    assert activation_bytes(TINY, 1, 128, 128, 4) == 4 * one
    assert activation_bytes(TINY, 1, 64, 64, 2) * 2 == one


def _border_gradient_ratio(image: torch.Tensor, borders: list[int]) -> float:
    """Mean |horizontal difference| across the given columns over that elsewhere."""
    diff = (image[..., 1:] - image[..., :-1]).abs().mean(dim=(0, 1, 2))
    at_borders = torch.zeros_like(diff, dtype=torch.bool)
    for column in borders:
        at_borders[column - 1] = True
    return float(diff[at_borders].mean() / diff[~at_borders].mean())


def test_blending_every_step_leaves_no_seam():
    # The bundled model sampling from pure noise (ancestral on its schedule respaced to 25 steps,
    # where tiles that do not share their noise would disagree most) on a smooth synthetic photo,
    # tiles of 64 output pixels at known columns; deterministic, so the only difference between
    # the runs is the tiling. (Its low frequencies come from the condition, so even touching
    # tiles disagree only in their detail: 1.35 against 0.85 with blending.)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 24), torch.linspace(0, 1, 64), indexing="ij")
    lr = torch.stack([0.5 + 0.4 * torch.sin(6 * xx + 2 * yy), 0.5 + 0.3 * torch.cos(4 * yy), 0.3 + 0.4 * xx])[None]
    engine = sr3.SR3Engine.from_pretrained("demo-x4", progress=False)

    def ratio(overlap: int) -> float:
        starts = engine.tile_grid(1, (96, 256), tile=64, tile_overlap=overlap).starts[1]
        out = engine.sample(lr, generator=_seeded(0), steps=25, tile=64, tile_overlap=overlap,
                            sampler=sr3.SamplerConfig("ancestral"))
        return _border_gradient_ratio(out, sorted({s for s in starts[1:]} | {s + 64 for s in starts[:-1]}))

    assert ratio(16) < 1.0
    assert ratio(0) > 1.25  # tiles that only touch: the measure does see seams


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fused_tiles_on_cuda_replay_one_captured_denoiser_and_match_eager(tiny_model):
    # Three 16x16 tiles per call over 16 tiles: five full calls and one of a single tile, which
    # the graph captured for three must serve (padded), on every step and on a second sample.
    per_tile = tiling.working_bytes(TINY, 1, 16, 16, 4) - tiling.WORKSPACE_BYTES
    options = dict(device="cuda", dtype=torch.float32, tile=16, tile_overlap=4,
                   max_memory=tiling.WORKSPACE_BYTES + 3 * per_tile)
    eager = _engine(copy.deepcopy(tiny_model), **options)
    fused = _engine(copy.deepcopy(tiny_model), backend="fused", backend_options={"in_kernel_noise": False},
                    **options)
    grid = fused.tile_grid(1, (44, 44))
    assert (grid.count, grid.tiles_per_call) == (16, 3)
    lr = torch.rand(1, 3, 22, 22, generator=_seeded(3))
    for seed in (1, 2):
        torch.testing.assert_close(fused.sample(lr, generator=_seeded(seed)), eager.sample(lr, generator=_seeded(seed)),
                                   rtol=0, atol=2e-3)
    assert fused.backend.cached_graphs == 1
