"""Randomized smoothing: prediction and l2 certification by Monte Carlo (Cohen, Rosenfeld & Kolter, ICML 2019).

The smoothed classifier is g(x) = argmax_c P[f(x + e) = c] with e the noise of a smoothing method and f
the base classifier. Radii are l2 distances in [0, 1] pixel units.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import binomtest
from torch import nn

from qrobust.smoothing.confidence import check_alpha, check_count, clopper_pearson_lower
from qrobust.smoothing.methods import SmoothingMethod


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


class SmoothedClassifier:
    """A base classifier smoothed by the noise of a smoothing method.

    Args:
        base: maps the method's noisy inputs (B, C, H, W) to logits (B, num_classes); put in eval mode.
        num_classes: number of classes of ``base``.
        method: the smoothing method (``FloatRS``, ``FloatRSQuant``, ...): noise and radius rule.
        batch_size: noisy samples per forward pass (memory vs. speed); the noise stream of a seeded
            generator is drawn in batches of this size, so keep it fixed to reproduce a run.
        noise_bank_seed: if set, noise is drawn once from a generator with this seed and reused for
            every input (rows 0..n0-1 select the class, rows n0.. estimate it, so the two stay
            independent); per-call generators are then unused. Each certificate keeps its guarantee,
            since the bank does not depend on the input, and sampling cost leaves the loop, which
            matters when the base model is fast (int8). The bank holds (n0 + n) noisy images.
    """

    def __init__(
        self,
        base: nn.Module,
        num_classes: int,
        method: SmoothingMethod,
        batch_size: int = 256,
        noise_bank_seed: int | None = None,
    ):
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.base = base.eval()
        self.num_classes = num_classes
        self.method = method
        self.batch_size = batch_size
        self.noise_bank_seed = noise_bank_seed
        self._bank: tuple[tuple[int, ...], torch.Tensor] | None = None

    def predict(self, x: torch.Tensor, n: int, alpha: float, generator: torch.Generator | None = None) -> Prediction:
        """Predict g(x) from ``n`` noisy samples, abstaining unless a two-sided binomial test on the
        top-two counts rejects a tie at level ``alpha``; then P[label != g(x)] <= alpha."""
        check_count("n", n)
        check_alpha(alpha)
        counts = self.sample_counts(x, n, generator, self.noise_bank(x, n))
        second, top = np.argsort(counts, kind="stable")[-2:]
        test = binomtest(int(counts[top]), int(counts[top] + counts[second]), p=0.5)
        label = int(top) if test.pvalue <= alpha else None
        return Prediction(label, counts)

    def certify(
        self, x: torch.Tensor, n0: int, n: int, alpha: float, generator: torch.Generator | None = None
    ) -> Certificate:
        """CERTIFY of Cohen et al.: guess the top class from ``n0`` samples, count its votes in ``n`` fresh
        samples, and return the method's radius for that count (sigma * Phi^-1(pA_lower) for Gaussian
        noise, pA_lower the Clopper-Pearson bound at level ``alpha``), abstaining when it has none."""
        check_count("n0", n0)
        check_count("n", n)
        check_alpha(alpha)
        bank = self.noise_bank(x, n0 + n)
        guess = int(np.argmax(self.sample_counts(x, n0, generator, None if bank is None else bank[:n0])))
        counts = self.sample_counts(x, n, generator, None if bank is None else bank[n0:])
        return self.certificate(guess, counts, alpha)

    def certificate(self, guess: int, counts: np.ndarray, alpha: float) -> Certificate:
        """The certificate of top-class ``guess`` (chosen on samples independent of ``counts``) from the
        votes ``counts`` (num_classes,) of n = counts.sum() estimation samples: the method's radius for
        counts[guess] of n at level ``alpha``, or an abstention when it has none."""
        n = int(counts.sum())
        radius = self.method.radius(int(counts[guess]), n, alpha)
        p_lower = clopper_pearson_lower(int(counts[guess]), n, alpha)
        if radius is None:
            return Certificate(None, 0.0, p_lower, counts)
        return Certificate(guess, radius, p_lower, counts)

    def sample_counts(
        self, x: torch.Tensor, num: int, generator: torch.Generator | None = None, noise: torch.Tensor | None = None
    ) -> np.ndarray:
        """Votes of the base classifier on ``num`` noisy copies of ``x``: an int64 array (num_classes,).

        The noise is fresh from ``generator``, or the first ``num`` rows of ``noise`` (num, *x.shape).
        """
        return np.bincount(self.sample_predictions(x, num, generator, noise), minlength=self.num_classes)

    @torch.inference_mode()
    def sample_predictions(
        self, x: torch.Tensor, num: int, generator: torch.Generator | None = None, noise: torch.Tensor | None = None
    ) -> np.ndarray:
        """The base classifier's class on each of ``num`` noisy copies of ``x``: an int64 array (num,), in draw order.

        The noise is fresh from ``generator``, drawn in batches of ``batch_size`` (one ``method.perturb``
        call per batch), or the first ``num`` rows of ``noise`` (num, *x.shape).
        """
        predictions = torch.empty(num, dtype=torch.int64, device=x.device)
        for start in range(0, num, self.batch_size):
            size = min(self.batch_size, num - start)
            batch = x.unsqueeze(0).expand(size, *x.shape)  # (size, C, H, W), a view until noise is added
            if noise is None:
                inputs = self.method.perturb(batch, generator)
            else:
                inputs = self.method.apply(batch, noise[start : start + size])
            predictions[start : start + size] = self.base(inputs).argmax(dim=1)
        return predictions.cpu().numpy()

    def noise_bank(self, x: torch.Tensor, rows: int) -> torch.Tensor | None:
        """The shared noise of ``rows`` samples shaped like ``x``, drawn once per (rows, shape)."""
        if self.noise_bank_seed is None:
            return None
        key = (rows, *x.shape)
        if self._bank is None or self._bank[0] != key:
            generator = torch.Generator().manual_seed(self.noise_bank_seed)
            self._bank = (key, self.method.sample_noise(key, generator))
        return self._bank[1]
