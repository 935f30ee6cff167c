"""Isotropic continuous Gaussian noise in [0, 1] input space (Cohen et al., ICML 2019)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qrobust.checks import check_sigma


@dataclass(frozen=True)
class GaussianNoise:
    """N(0, sigma^2 I) added to float inputs; ``sigma`` is in units of the [0, 1] pixel scale.

    Samplers know nothing of models: ``perturb`` only adds noise, it does not clip, because the
    smoothing guarantee of Cohen et al. holds for the unclipped Gaussian.
    """

    sigma: float

    def __post_init__(self) -> None:
        check_sigma(self.sigma)

    def sample(self, like: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Noise with the shape, dtype and device of ``like``."""
        noise = torch.randn(like.shape, generator=generator, dtype=like.dtype, device=like.device)
        return noise.mul_(self.sigma)

    def perturb(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``x`` plus fresh noise (a new tensor; ``x`` is not modified)."""
        return x + self.sample(x, generator)
