import math

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from sr3_engine import metrics, resize


def _pair(seed: int = 0, size: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    a = torch.rand(2, 3, size, size, generator=generator)
    b = (a + 0.1 * torch.randn(2, 3, size, size, generator=generator)).clamp(0.0, 1.0)
    return a, b


def test_psnr_of_a_constant_offset_is_exact():
    # Every 8-bit level differs by 10, so MSE = 100 and PSNR = 10 log10(255^2 / 100).
    a = torch.zeros(3, 16, 16)
    b = torch.full((3, 16, 16), 10.0 / 255.0)
    assert metrics.psnr(a, b).item() == pytest.approx(10.0 * math.log10(255.0**2 / 100.0), abs=1e-12)


def test_psnr_matches_first_principles_on_8_bit_levels():
    a, b = _pair()
    a8, b8 = (np.round(x.double().numpy() * 255.0) for x in (a, b))
    expected = [10.0 * math.log10(255.0**2 / np.mean((x - y) ** 2)) for x, y in zip(a8, b8)]
    assert metrics.psnr(a, b).tolist() == pytest.approx(expected, abs=1e-10)
    assert metrics.psnr(a * 255.0, b * 255.0, data_range=255.0).tolist() == pytest.approx(expected, abs=1e-10)


def test_psnr_of_identical_images_is_infinite():
    a, _ = _pair()
    assert torch.isinf(metrics.psnr(a, a)).all()


def test_ssim_of_identical_images_is_one():
    a, _ = _pair()
    assert metrics.ssim(a, a).tolist() == pytest.approx([1.0, 1.0], abs=1e-12)


def test_ssim_matches_scikit_image_on_a_known_pair():
    a, b = _pair(seed=3)
    a8, b8 = (np.round(x.permute(0, 2, 3, 1).double().numpy() * 255.0) for x in (a, b))
    expected = [structural_similarity(x, y, channel_axis=-1, data_range=255.0, gaussian_weights=True, sigma=1.5,
                                      use_sample_covariance=False) for x, y in zip(a8, b8)]
    values = metrics.ssim(a, b)
    assert values.tolist() == pytest.approx(expected, abs=1e-12)
    assert 0.0 < float(values.min()) < float(values.max()) < 1.0


def test_ssim_rejects_images_smaller_than_its_window():
    with pytest.raises(ValueError, match="at least 11x11"):
        metrics.ssim(torch.zeros(3, 8, 8), torch.zeros(3, 8, 8))


def test_consistency_is_zero_when_the_output_reproduces_its_input():
    hr = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    lr = resize.downsample(hr.double(), 4)
    assert metrics.consistency(hr, lr, 4).tolist() == [0.0, 0.0]


def test_consistency_of_a_constant_offset_is_its_square():
    hr = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(2))
    lr = resize.downsample(hr[None].double(), 4)[0] + 0.1
    assert metrics.consistency(hr, lr, 4).item() == pytest.approx(0.01, abs=1e-12)


def test_metrics_reject_mismatched_shapes():
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.psnr(torch.zeros(3, 16, 16), torch.zeros(3, 16, 8))
    with pytest.raises(ValueError, match="not lr"):
        metrics.consistency(torch.zeros(3, 32, 32), torch.zeros(3, 4, 4), 4)


def test_laplacian_energy_is_scipys_laplacian_on_the_interior():
    from scipy import ndimage

    x = torch.rand(2, 3, 9, 13, generator=torch.Generator().manual_seed(0))
    expected = [np.mean([np.abs(ndimage.laplace(channel.numpy().astype(np.float64))[1:-1, 1:-1])
                         for channel in image]) for image in x]
    np.testing.assert_allclose(metrics.laplacian_energy(x).numpy(), expected, rtol=1e-12)


def test_detail_is_one_for_the_photo_below_for_bicubic_and_above_for_noise():
    hr = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    hr = torch.nn.functional.avg_pool2d(hr, 3, 1, 1)
    bicubic = resize.upsample(resize.downsample(hr, 4), 4).clamp(0, 1)
    noisy = (hr + 0.2 * torch.randn(hr.shape, generator=torch.Generator().manual_seed(2))).clamp(0, 1)
    assert metrics.detail(hr, hr).item() == pytest.approx(1.0)
    assert metrics.detail(bicubic, hr).item() < 0.5
    assert metrics.detail(noisy, hr).item() > 1.5
    with pytest.raises(ValueError, match="differ in shape"):
        metrics.detail(hr, hr[..., :32])
