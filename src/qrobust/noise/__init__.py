"""Noise distributions for randomized smoothing and noise-augmented training."""

from qrobust.noise.discrete import (
    DiscreteGaussianNoise,
    discrete_gaussian_from_uniform,
    exact_discrete_gaussian,
    sample_discrete_gaussian,
)
from qrobust.noise.gaussian import GaussianNoise
from qrobust.noise.table import InverseCdfTable, discrete_gaussian_pmf, inverse_cdf_table

__all__ = [
    "DiscreteGaussianNoise",
    "GaussianNoise",
    "InverseCdfTable",
    "discrete_gaussian_from_uniform",
    "discrete_gaussian_pmf",
    "exact_discrete_gaussian",
    "inverse_cdf_table",
    "sample_discrete_gaussian",
]
