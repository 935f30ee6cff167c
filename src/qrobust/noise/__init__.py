"""Noise distributions for randomized smoothing and noise-augmented training."""

from qrobust.noise.gaussian import GaussianNoise

__all__ = ["GaussianNoise"]
