import math
import random

import numpy as np
import pytest
import torch
from scipy import stats

from qrobust.noise import (
    DiscreteGaussianNoise,
    discrete_gaussian_from_uniform,
    discrete_gaussian_pmf,
    exact_discrete_gaussian,
    inverse_cdf_table,
    sample_discrete_gaussian,
)
from qrobust.noise.table import GUIDE_BITS, MAX_SIGMA_INT

SIGMAS = [0.5, 2.0, 31.875, 63.75, 255.0]


def chisquare_pvalue(draws: np.ndarray, sigma_int: float) -> float:
    """Goodness of fit of integer draws to the exact pmf, tails pooled so every bin expects >= 5."""
    offset = inverse_cdf_table(sigma_int).offset
    assert np.abs(draws).max() <= offset
    support = np.arange(-offset, offset + 1)
    observed = np.bincount(draws + offset, minlength=support.size)
    expected = discrete_gaussian_pmf(support, sigma_int) * draws.size
    expected *= draws.size / expected.sum()  # the mass beyond +-offset is < 2^-64
    core = np.flatnonzero(expected >= 5)
    first, last = core[0], core[-1]  # the pmf is unimodal, so every bin in between expects >= 5

    def pool(counts):
        return np.concatenate([[counts[: first + 1].sum()], counts[first + 1 : last], [counts[last:].sum()]])

    return stats.chisquare(pool(observed), pool(expected)).pvalue


@pytest.mark.parametrize("sigma_int", SIGMAS)
def test_fast_sampler_fits_the_exact_pmf(sigma_int):
    draws = sample_discrete_gaussian(sigma_int, 1_000_000, torch.Generator().manual_seed(11))
    assert chisquare_pvalue(draws.numpy().astype(np.int64), sigma_int) > 1e-3


@pytest.mark.parametrize("sigma_int", SIGMAS)
def test_exact_cks_sampler_fits_the_exact_pmf(sigma_int):
    draws = exact_discrete_gaussian(sigma_int, 20_000, random.Random(5))
    assert draws.dtype == np.int64
    assert chisquare_pvalue(draws, sigma_int) > 1e-3


@pytest.mark.parametrize("sigma_int", [0.5, 2.0])
def test_chisquare_detects_rounded_continuous_noise(sigma_int):
    # The check above has power: rounding N(0, sigma^2) is a different distribution at small sigma.
    generator = torch.Generator().manual_seed(11)
    rounded = torch.randn(1_000_000, generator=generator, dtype=torch.float64).mul(sigma_int).round()
    assert chisquare_pvalue(rounded.long().numpy(), sigma_int) < 1e-6


def boundary_words(sigma_int: float) -> np.ndarray:
    """0, 2^64 - 1, each threshold and its neighbours, and the first and last word of every guide bucket."""
    thresholds = [int(t) for t in inverse_cdf_table(sigma_int).thresholds]
    near = {t + d for t in thresholds for d in (-1, 0, 1)} | {0, 2**64 - 1}
    words = np.array(sorted(w for w in near if 0 <= w < 2**64), dtype=np.uint64)
    first = np.arange(2**GUIDE_BITS, dtype=np.uint64) << np.uint64(64 - GUIDE_BITS)
    return np.concatenate([words, first, first | np.uint64(2 ** (64 - GUIDE_BITS) - 1)])


@pytest.mark.parametrize("sigma_int", [0.001, *SIGMAS, MAX_SIGMA_INT])
def test_guide_table_agrees_exactly_with_plain_search(sigma_int):
    table = inverse_cdf_table(sigma_int)
    random_words = np.random.default_rng(2).integers(0, 2**64, size=1_000_000, dtype=np.uint64)
    words = np.concatenate([boundary_words(sigma_int), random_words])
    expected = np.searchsorted(table.thresholds, words, side="right").astype(np.int64) - table.offset

    from_numpy = discrete_gaussian_from_uniform(words, sigma_int)
    assert from_numpy.dtype == np.int16
    np.testing.assert_array_equal(from_numpy, expected)
    from_torch = discrete_gaussian_from_uniform(torch.from_numpy(words.view(np.int64)), sigma_int)
    assert from_torch.dtype == torch.int16
    np.testing.assert_array_equal(from_torch.numpy(), expected)
    grid = random_words.reshape(1000, 1000)
    np.testing.assert_array_equal(
        discrete_gaussian_from_uniform(grid, sigma_int), expected[-grid.size :].reshape(grid.shape)
    )


def test_generator_paths_use_the_words_of_their_generator():
    n = 300_001  # several chunks and a ragged end
    words = torch.empty(n, dtype=torch.int64).random_(-(2**63), None, generator=torch.Generator().manual_seed(3))
    sampled = sample_discrete_gaussian(63.75, n, torch.Generator().manual_seed(3))
    assert torch.equal(sampled, discrete_gaussian_from_uniform(words, 63.75))

    numpy_words = np.random.default_rng(4).integers(0, 2**64, size=(3, 1000), dtype=np.uint64)
    sampled = sample_discrete_gaussian(63.75, (3, 1000), np.random.default_rng(4))
    np.testing.assert_array_equal(sampled.numpy(), discrete_gaussian_from_uniform(numpy_words, 63.75))


@pytest.mark.parametrize("sigma_int", [*SIGMAS, MAX_SIGMA_INT])
def test_table_is_symmetric_and_close_to_exact(sigma_int):
    table = inverse_cdf_table(sigma_int)
    edges = np.array([0, *map(int, table.thresholds), 2**64], dtype=object)
    masses = np.diff(edges)
    assert list(masses) == list(masses[::-1])
    assert all(masses >= 0)
    assert table.tail_mass < 2**-64
    assert 0 < table.tv_distance < 2**-50


def test_pmf_matches_poisson_summation_and_sums_to_one():
    # For sigma >= 1, Z = sqrt(2 pi) sigma (1 + 2 exp(-2 pi^2 sigma^2) + ...), so P[0] = 1 / (sqrt(2 pi) sigma).
    assert discrete_gaussian_pmf([0], 2.0)[0] == pytest.approx(1 / (math.sqrt(2 * math.pi) * 2.0), rel=1e-14)
    assert discrete_gaussian_pmf(np.arange(-30, 31), 2.0).sum() == pytest.approx(1.0, rel=1e-14)
    ratio = discrete_gaussian_pmf([3], 0.5)[0] / discrete_gaussian_pmf([0], 0.5)[0]
    assert ratio == pytest.approx(math.exp(-18), rel=1e-14)


def test_mean_variance_and_symmetry_of_samples():
    sigma_int, n = 63.75, 1_000_000
    draws = sample_discrete_gaussian(sigma_int, n, torch.Generator().manual_seed(8)).double()
    assert abs(draws.mean().item()) < 5 * sigma_int / math.sqrt(n)
    # The variance of N_Z(0, s^2) is s^2 up to exp(-2 pi^2 s^2); its sample estimate has sd ~ s^2 sqrt(2 / n).
    assert draws.var().item() == pytest.approx(sigma_int**2, rel=5 * math.sqrt(2 / n))
    positive, negative = (draws > 0).sum().item(), (draws < 0).sum().item()
    assert stats.binomtest(positive, positive + negative).pvalue > 1e-3


def test_small_sigma_has_the_exact_zero_one_masses():
    draws = sample_discrete_gaussian(0.5, 1_000_000, torch.Generator().manual_seed(9))
    zero = discrete_gaussian_pmf([0], 0.5)[0]
    assert (draws == 0).double().mean().item() == pytest.approx(zero, abs=5 * math.sqrt(zero * (1 - zero) / 1e6))


def test_seeded_generators_reproduce():
    def torch_draws(seed):
        return DiscreteGaussianNoise(0.25).sample(
            torch.zeros(5, 7, dtype=torch.uint8), torch.Generator().manual_seed(seed)
        )

    assert torch.equal(torch_draws(1), torch_draws(1))
    assert not torch.equal(torch_draws(1), torch_draws(2))
    numpy_draws = [sample_discrete_gaussian(2.0, 50, np.random.default_rng(seed)) for seed in (1, 1, 2)]
    assert torch.equal(numpy_draws[0], numpy_draws[1]) and not torch.equal(numpy_draws[0], numpy_draws[2])
    exact = [exact_discrete_gaussian(2.0, 50, rng) for rng in (random.Random(1), random.Random(1), random.Random(2))]
    assert np.array_equal(exact[0], exact[1]) and not np.array_equal(exact[0], exact[2])
    from_numpy = [exact_discrete_gaussian(2.0, 50, np.random.default_rng(seed)) for seed in (3, 3)]
    assert np.array_equal(*from_numpy)


@pytest.mark.parametrize(
    ("dtype", "widened"),
    [(torch.uint8, torch.int16), (torch.int8, torch.int16), (torch.int16, torch.int32), (torch.int32, torch.int64)],
)
def test_noise_dtype_shape_and_unclipped_perturb(dtype, widened):
    noise = DiscreteGaussianNoise(0.25)
    assert noise.sigma_int == 63.75
    x = torch.full((4, 3, 8, 8), 100, dtype=dtype)
    before = x.clone()
    sample = noise.sample(x, torch.Generator().manual_seed(7))
    perturbed = noise.perturb(x, torch.Generator().manual_seed(7))
    assert sample.shape == x.shape and sample.dtype == widened and sample.device == x.device
    assert perturbed.dtype == widened
    assert torch.equal(perturbed, sample + 100)
    assert torch.equal(x, before)
    assert sample.min() < -100 and sample.max() > 100


def test_perturb_of_uint8_extremes_leaves_the_pixel_range():
    x = torch.tensor([0, 255] * 500, dtype=torch.uint8)
    perturbed = DiscreteGaussianNoise(0.25).perturb(x, torch.Generator().manual_seed(0))
    assert perturbed.min() < 0 and perturbed.max() > 255


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_sampling_on_gpu_matches_its_own_words():
    generator = torch.Generator("cuda").manual_seed(0)
    sample = DiscreteGaussianNoise(0.25).sample(torch.zeros(1000, dtype=torch.uint8, device="cuda"), generator)
    assert sample.device.type == "cuda" and sample.dtype == torch.int16
    words = torch.empty(100_000, dtype=torch.int64, device="cuda").random_(-(2**63), None)
    expected = np.searchsorted(inverse_cdf_table(63.75).thresholds, words.cpu().numpy().view(np.uint64), side="right")
    assert np.array_equal(
        discrete_gaussian_from_uniform(words, 63.75).cpu().numpy(), expected - inverse_cdf_table(63.75).offset
    )


@pytest.mark.parametrize("sigma", [0, -0.5, math.nan, math.inf, "0.25", True])
def test_rejects_bad_sigma(sigma):
    with pytest.raises(ValueError, match="sigma must be"):
        DiscreteGaussianNoise(sigma)


@pytest.mark.parametrize("scale", [0, -255, 255.0, True])
def test_rejects_bad_scale(scale):
    with pytest.raises(ValueError, match="scale must be"):
        DiscreteGaussianNoise(0.25, scale)


def test_rejects_sigma_int_beyond_the_table_range():
    with pytest.raises(ValueError, match="sigma_int must be"):
        DiscreteGaussianNoise(10.0)
    for call in (
        lambda: sample_discrete_gaussian(0.0, 10),
        lambda: inverse_cdf_table(math.inf),
        lambda: discrete_gaussian_pmf([0], -1.0),
        lambda: exact_discrete_gaussian(math.nan, 10, random.Random(0)),
    ):
        with pytest.raises(ValueError, match="sigma_int must be"):
            call()


def test_rejects_bad_inputs():
    noise = DiscreteGaussianNoise(0.25)
    with pytest.raises(ValueError, match="like must be a tensor of dtype uint8"):
        noise.sample(torch.zeros(3))
    with pytest.raises(ValueError, match="like must be a tensor of dtype uint8"):
        noise.perturb(torch.zeros(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="numpy words must have dtype uint64"):
        discrete_gaussian_from_uniform(np.zeros(3, dtype=np.int64), 2.0)
    with pytest.raises(ValueError, match="torch words must have dtype int64 or uint64"):
        discrete_gaussian_from_uniform(torch.zeros(3, dtype=torch.int32), 2.0)
    with pytest.raises(ValueError, match="size must be an int >= 0"):
        exact_discrete_gaussian(2.0, -1, random.Random(0))
