import math

import pytest
import torch
from scipy import stats

from qrobust.noise import GaussianNoise


@pytest.mark.parametrize("sigma", [0, -0.5, math.nan, math.inf])
def test_rejects_bad_sigma(sigma):
    with pytest.raises(ValueError, match="sigma must be"):
        GaussianNoise(sigma)


@pytest.mark.parametrize("sigma", [0.12, 0.5, 1.0])
def test_samples_follow_the_normal_distribution(sigma):
    noise = GaussianNoise(sigma).sample(torch.zeros(200_000), torch.Generator().manual_seed(1))
    result = stats.kstest(noise.numpy() / sigma, "norm")
    assert result.pvalue > 1e-3
    assert noise.std().item() == pytest.approx(sigma, rel=0.01)


def test_perturb_keeps_input_dtype_and_is_reproducible():
    x = torch.rand(3, 1, 4, 4, dtype=torch.float64)
    before = x.clone()
    first = GaussianNoise(0.25).perturb(x, torch.Generator().manual_seed(7))
    second = GaussianNoise(0.25).perturb(x, torch.Generator().manual_seed(7))
    assert first.dtype == torch.float64 and first.shape == x.shape
    assert torch.equal(first, second)
    assert torch.equal(x, before)
    assert not torch.equal(first, x)
