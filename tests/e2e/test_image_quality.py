import numpy as np

from tests.e2e.image_quality import psnr, ssim


def test_metrics_on_known_cases():
    rng = np.random.default_rng(0)
    a = rng.random((32, 32, 3))
    assert psnr(a, a) == float("inf") and abs(ssim(a, a) - 1) < 1e-12
    b = np.clip(a + 0.01, 0, 1)
    assert 39 < psnr(a, np.clip(a + 0.01, 0, 2)) < 41  # uniform 0.01 error: exactly 40 dB before clipping
    assert ssim(a, rng.random((32, 32, 3))) < 0.1  # unrelated noise
    assert ssim(a, b) > 0.99
