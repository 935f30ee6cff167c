"""Randomized smoothing: prediction and l2 certification by Monte Carlo (Cohen, Rosenfeld & Kolter, ICML 2019).

The smoothed classifier is g(x) = argmax_c P[f(x + e) = c] with e ~ N(0, sigma^2 I) and f the base
classifier. Radii are l2 distances in the base model's input space, [0, 1] pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import beta, binomtest, norm
from torch import nn

from qrobust.noise import GaussianNoise


@dataclass(frozen=True)
class Prediction:
    """Output of ``SmoothedClassifier.predict``: the class, or ``None`` when the test abstained."""

    label: int | None
    counts: np.ndarray  # (num_classes,) votes of the n noisy samples

    @property
    def abstained(self) -> bool:
        return self.label is None


@dataclass(frozen=True)
class Certificate:
    """Output of ``SmoothedClassifier.certify``.

    When not abstained, with probability at least 1 - alpha over the sampling, the smoothed classifier
    returns ``label`` for every input within l2 distance ``radius`` of x. When abstained, ``label`` is
    None and ``radius`` is 0.
    """

    label: int | None
    radius: float
    p_lower: float  # one-sided (1 - alpha) Clopper-Pearson lower bound on P[f(x + e) = label]
    counts: np.ndarray  # (num_classes,) votes of the n estimation samples

    @property
    def abstained(self) -> bool:
        return self.label is None


def clopper_pearson_lower(successes: int, trials: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson lower confidence bound on a binomial proportion.

    The exact bound is the alpha quantile of Beta(k, n - k + 1), and 0 when k = 0.
    """
    check_alpha(alpha)
    if not 0 <= successes <= trials:
        raise ValueError(f"successes must be in [0, trials={trials}], got {successes}")
    if successes == 0:
        return 0.0
    return float(beta.ppf(alpha, successes, trials - successes + 1))


class SmoothedClassifier:
    """A base classifier smoothed by additive noise.

    Args:
        base: maps inputs of shape (B, *x.shape) to logits (B, num_classes); put in eval mode here.
        num_classes: number of classes of ``base``.
        noise: the smoothing distribution; its ``sigma`` sets the radius scale.
        batch_size: noisy samples per forward pass (memory vs. speed); the noise stream of a seeded
            generator is drawn in batches of this size, so keep it fixed to reproduce a run.
    """

    def __init__(self, base: nn.Module, num_classes: int, noise: GaussianNoise, batch_size: int = 256):
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.base = base.eval()
        self.num_classes = num_classes
        self.noise = noise
        self.batch_size = batch_size

    @property
    def sigma(self) -> float:
        return self.noise.sigma

    def predict(self, x: torch.Tensor, n: int, alpha: float, generator: torch.Generator | None = None) -> Prediction:
        """Predict g(x) from ``n`` noisy samples, abstaining unless a two-sided binomial test on the
        top-two counts rejects a tie at level ``alpha``; then P[label != g(x)] <= alpha."""
        check_count("n", n)
        check_alpha(alpha)
        counts = self.sample_counts(x, n, generator)
        second, top = np.argsort(counts, kind="stable")[-2:]
        test = binomtest(int(counts[top]), int(counts[top] + counts[second]), p=0.5)
        label = int(top) if test.pvalue <= alpha else None
        return Prediction(label, counts)

    def certify(
        self, x: torch.Tensor, n0: int, n: int, alpha: float, generator: torch.Generator | None = None
    ) -> Certificate:
        """CERTIFY of Cohen et al.: guess the top class from ``n0`` samples, lower-bound its probability
        pA from ``n`` fresh samples by Clopper-Pearson at level ``alpha``, and return the l2 radius
        sigma * Phi^-1(pA_lower), abstaining when pA_lower <= 1/2."""
        check_count("n0", n0)
        check_count("n", n)
        check_alpha(alpha)
        guess = int(np.argmax(self.sample_counts(x, n0, generator)))
        counts = self.sample_counts(x, n, generator)
        p_lower = clopper_pearson_lower(int(counts[guess]), n, alpha)
        if p_lower <= 0.5:
            return Certificate(None, 0.0, p_lower, counts)
        return Certificate(guess, self.sigma * float(norm.ppf(p_lower)), p_lower, counts)

    @torch.inference_mode()
    def sample_counts(self, x: torch.Tensor, num: int, generator: torch.Generator | None = None) -> np.ndarray:
        """Votes of the base classifier on ``num`` noisy copies of ``x``: an int64 array (num_classes,)."""
        check_input(x)
        counts = torch.zeros(self.num_classes, dtype=torch.int64, device=x.device)
        remaining = num
        while remaining > 0:
            size = min(self.batch_size, remaining)
            batch = x.unsqueeze(0).expand(size, *x.shape)  # (size, *x.shape), no copy until noise is added
            labels = self.base(self.noise.perturb(batch, generator)).argmax(dim=1)
            counts += torch.bincount(labels, minlength=self.num_classes)
            remaining -= size
        return counts.cpu().numpy()


def check_input(x: torch.Tensor) -> None:
    """Raise ValueError unless ``x`` is a finite float tensor in [0, 1]."""
    if not torch.is_floating_point(x):
        raise ValueError(f"x must be a floating-point tensor in [0, 1], got dtype {x.dtype}")
    if not torch.isfinite(x).all():
        raise ValueError("x contains NaN or infinite values")
    if x.numel() and (x.min() < 0 or x.max() > 1):
        raise ValueError(f"x must lie in [0, 1], got values in [{x.min().item():.3g}, {x.max().item():.3g}]")


def check_count(name: str, value: int) -> None:
    """Raise ValueError unless the sample count ``value`` is an integer >= 1."""
    if int(value) != value or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def check_alpha(alpha: float) -> None:
    """Raise ValueError unless the failure probability ``alpha`` is in (0, 1)."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
