"""Randomized smoothing: prediction and l2 certification by Monte Carlo (Cohen, Rosenfeld & Kolter, ICML 2019).

The smoothed classifier is g(x) = argmax_c P[f(x + e) = c] with e the noise of a smoothing method and f
the base classifier. Radii are l2 distances in [0, 1] pixel units.

Non-finite logits: a noisy sample whose logit row is not all finite (NaN, +inf or -inf anywhere) is
classified as "no class", so f takes values in {0, ..., num_classes - 1, no class} and g(x) is the most
likely of them. A vote for no class counts among the n samples but for no class, so it can only lower
pA_lower; every guarantee below holds for this f, and "no class" is never returned as a label (certify
and predict abstain instead). A base model whose output is not a (batch, num_classes) tensor is refused
with ``QRobustError`` on its first batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from qrobust.devices import generator_on, module_device, require_cpu, resolve_device
from qrobust.errors import QRobustError
from qrobust.smoothing.confidence import check_alpha, check_count, clopper_pearson_lower
from qrobust.smoothing.methods import SmoothingMethod, radius_map_for
from qrobust.smoothing.randomized import randomized_clopper_pearson_lower


@dataclass(frozen=True)
class Prediction:
    """Output of ``SmoothedClassifier.predict``: the class, or ``None`` when the test abstained."""

    label: int | None
    counts: np.ndarray  # (num_classes,) votes of the n noisy samples
    no_class: int = field(default=0, kw_only=True)  # samples with non-finite logits: n = counts.sum() + no_class

    @property
    def abstained(self) -> bool:
        return self.label is None


@dataclass(frozen=True)
class Certificate:
    """Output of ``SmoothedClassifier.certify``.

    When not abstained, with probability at least 1 - alpha over the sampling, the smoothed classifier
    returns ``label`` for every input within l2 distance ``radius`` of x: P[f(x' + e) = label] exceeds the
    probability of every other class and of "no class" (non-finite logits) there. ``label`` is always in
    [0, num_classes), and samples with non-finite logits count in n but for no class. When abstained,
    ``label`` is None and ``radius`` is 0.
    """

    label: int | None
    radius: float
    # A (1 - alpha) lower bound on pA = P[f(x + e) = guessed class]: the one-sided Clopper-Pearson bound
    # of the estimation count (``certify``), its randomized version (``certify(bound_rng=...)``), the
    # confidence-sequence bound (``certify_adaptive``, "cs") or Clopper-Pearson at alpha / K ("union").
    p_lower: float
    counts: np.ndarray  # (num_classes,) votes of the n estimation samples
    no_class: int = field(default=0, kw_only=True)  # estimation samples with non-finite logits

    @property
    def abstained(self) -> bool:
        return self.label is None

    @property
    def samples(self) -> int:
        """The estimation samples this certificate used: counts.sum() + no_class (n0 not included)."""
        return int(self.counts.sum()) + self.no_class


class SmoothedClassifier:
    """A base classifier smoothed by the noise of a smoothing method.

    Args:
        base: maps the method's noisy inputs (B, C, H, W) to logits (B, num_classes); put in eval mode.
            A row that is not all finite is a vote for no class; any other output shape is refused.
        num_classes: number of classes of ``base``.
        method: the smoothing method (``FloatRS``, ``FloatRSQuant``, ...): noise and radius rule.
        batch_size: noisy samples per forward pass (memory vs. speed); the noise stream of a seeded
            generator is drawn in batches of this size, so keep it fixed to reproduce a run.
        noise_bank_seed: if set, noise is drawn once from a generator with this seed and reused for
            every input (rows 0..n0-1 select the class, rows n0.. estimate it, so the two stay
            independent); per-call generators are then unused. Each certificate keeps its guarantee,
            since the bank does not depend on the input, and sampling cost leaves the loop, which
            matters when the base model is fast (int8). The bank holds (n0 + n) noisy images.
        device: where the base model runs, the noise is drawn and the noisy inputs are made ("auto",
            "cpu", "cuda", ... or a ``torch.device``); default: the device of ``base``'s parameters (the
            CPU for a model without any, e.g. a frozen TorchScript one). Inputs are moved there and the
            votes come back to the CPU. Int8 methods (IntRS, FloatRSQuant) run on the CPU only.

    Reproducibility per device: on the CPU a seeded generator's stream is used as it is. On an
    accelerator, a CPU generator is replaced per call (``predict``, ``select``, ``sample_predictions``)
    by one on the device seeded by one draw from it (``qrobust.devices.generator_on``), so a seed
    reproduces a run on the same kind of device, not across devices. A noise bank is drawn on the CPU
    and moved, so it is the same on every device.
    """

    def __init__(
        self,
        base: nn.Module,
        num_classes: int,
        method: SmoothingMethod,
        batch_size: int = 256,
        noise_bank_seed: int | None = None,
        device: torch.device | str | None = None,
    ):
        check_count("num_classes", num_classes, minimum=2)
        check_count("batch_size", batch_size)
        self.device = module_device(base) if device is None else resolve_device(device)
        if method.model_kind == "int8":
            require_cpu(self.device, f"{method.name} smoothing of an int8 model")
        self.base = base.eval()
        self.num_classes = num_classes
        self.method = method
        self.batch_size = batch_size
        self.noise_bank_seed = noise_bank_seed
        self._bank: tuple[tuple[int, ...], torch.Tensor] | None = None

    def predict(self, x: torch.Tensor, n: int, alpha: float, generator: torch.Generator | None = None) -> Prediction:
        """PREDICT of Cohen et al.: predict g(x) from ``n`` noisy samples, abstaining unless a two-sided
        binomial test on the top-two counts rejects a tie at level ``alpha``; then P[label is not None and
        label != g(x)] <= alpha. "No class" (samples with non-finite logits) competes as an outcome of
        its own: when it is the top one, the prediction abstains, so a label is never backed by them."""
        self.method.check_image(x)
        check_count("n", n)
        check_alpha(alpha)
        counts = self.sample_counts(x, n, generator_on(self.device, generator), self.noise_bank(x, n))
        outcomes = np.append(counts, n - counts.sum())  # (num_classes + 1,), the last is "no class"
        second, top = np.argsort(outcomes, kind="stable")[-2:]
        from scipy.stats import binomtest  # only predict needs scipy.stats, which costs 0.4 s to import

        test = binomtest(int(outcomes[top]), int(outcomes[top] + outcomes[second]), p=0.5)
        label = int(top) if top < self.num_classes and test.pvalue <= alpha else None
        return Prediction(label, counts, no_class=int(outcomes[-1]))

    def certify(
        self,
        x: torch.Tensor,
        n0: int,
        n: int,
        alpha: float,
        generator: torch.Generator | None = None,
        bound_rng: np.random.Generator | None = None,
    ) -> Certificate:
        """CERTIFY of Cohen et al.: guess the top class from ``n0`` samples, count its votes in ``n`` fresh
        samples, and return the method's radius for that count (sigma * Phi^-1(pA_lower) for Gaussian
        noise, pA_lower the Clopper-Pearson bound at level ``alpha``), abstaining when it has none.

        Guarantee: with probability at least 1 - alpha over the noise, a certificate that is not abstained
        is correct: g(x') = ``label`` for every x' with ||x' - x||_2 <= ``radius`` ([0, 1] pixel units; the
        lattice points of that ball for IntRS and lattice smoothing), g the smoothed classifier of f with
        a non-finite logit row read as "no class". Such samples count in n but for no class, so they only
        lower pA_lower, and when all n0 selection samples are such, the certificate abstains.

        ``bound_rng``: use the randomized Clopper-Pearson bound (``certificate``) with one uniform draw
        from it; the probability is then over the noise and that draw jointly.

        Raises:
            QRobustError: a bad argument (``x`` not an image the method takes, ``n0``/``n`` not integers
                >= 1, ``alpha`` not in (0, 1)), or ``base`` output that is not (batch, num_classes).
        """
        self.method.check_image(x)
        check_count("n0", n0)
        check_count("n", n)
        check_alpha(alpha)
        estimation = self.select(x, n0, n, generator)
        estimation.draw(n)
        return self.certificate(estimation.guess, estimation.counts, alpha, estimation.no_class, bound_rng)

    def select(self, x: torch.Tensor, n0: int, n_max: int, generator: torch.Generator | None = None) -> Estimation:
        """CERTIFY's first stage: guess the top class from ``n0`` samples and return the estimation
        stage, which draws up to ``n_max`` further samples on demand (rows n0.. of a noise bank)."""
        bank = self.noise_bank(x, n0 + n_max)
        generator = generator_on(self.device, generator)  # one stream for both stages
        guess = self.top_class(self.sample_counts(x, n0, generator, None if bank is None else bank[:n0]))
        return Estimation(self, x, guess, generator, None if bank is None else bank[n0:])

    def certificate(
        self,
        guess: int | None,
        counts: np.ndarray,
        alpha: float,
        no_class: int = 0,
        bound_rng: np.random.Generator | None = None,
    ) -> Certificate:
        """The certificate of top-class ``guess`` (chosen on samples independent of ``counts``; None to
        abstain) from the votes ``counts`` (num_classes,) and ``no_class`` votes for no class of the
        n = counts.sum() + no_class estimation samples: the method's radius for counts[guess] of n at level
        ``alpha``, or an abstention when it has none (with p_lower 0 when ``guess`` is None).

        ``bound_rng`` (opt-in): pA_lower is the randomized Clopper-Pearson bound
        (``qrobust.smoothing.randomized``) with one U(0, 1) draw from ``bound_rng``, and the radius is the
        method's radius map at that bound. It guarantees P[pA_lower >= pA] = alpha exactly, jointly over
        the votes and the draw (plain Clopper-Pearson: <= alpha, usually well below), so the certificate
        is correct with probability >= 1 - alpha as above, and never smaller than the plain one. Why a user
        might not want it: the radius depends on a coin as well as the votes (reruns with another seed
        give other radii on the same votes, anywhere between the bounds of count and count + 1), and at
        count = n it certifies an unbounded radius with probability alpha. Seed ``bound_rng`` and record
        the seed to reproduce a certificate.
        """
        n = int(counts.sum()) + no_class
        if guess is None:
            return Certificate(None, 0.0, 0.0, counts, no_class=no_class)
        if bound_rng is None:
            radius = self.method.radius(int(counts[guess]), n, alpha)
            p_lower = clopper_pearson_lower(int(counts[guess]), n, alpha)
        else:
            p_lower = randomized_clopper_pearson_lower(int(counts[guess]), n, alpha, bound_rng)
            radius = radius_map_for(self.method).radius(p_lower)
        if radius is None:
            return Certificate(None, 0.0, p_lower, counts, no_class=no_class)
        return Certificate(guess, radius, p_lower, counts, no_class=no_class)

    @staticmethod
    def top_class(counts: np.ndarray) -> int | None:
        """The class with the most votes in ``counts`` (num_classes,), the lowest on ties; None when no
        sample voted for a class (all had non-finite logits)."""
        return int(np.argmax(counts)) if counts.any() else None

    def sample_counts(
        self, x: torch.Tensor, num: int, generator: torch.Generator | None = None, noise: torch.Tensor | None = None
    ) -> np.ndarray:
        """Votes of the base classifier on ``num`` noisy copies of ``x``: an int64 array (num_classes,).

        Samples with non-finite logits vote for no class and are left out, so the sum may be below ``num``.
        The noise is fresh from ``generator``, or the first ``num`` rows of ``noise`` (num, *x.shape).
        """
        return count_votes(self.sample_predictions(x, num, generator, noise), self.num_classes)[0]

    @torch.inference_mode()
    def sample_predictions(
        self, x: torch.Tensor, num: int, generator: torch.Generator | None = None, noise: torch.Tensor | None = None
    ) -> np.ndarray:
        """The base classifier's class on each of ``num`` noisy copies of ``x``: an int64 array (num,), in draw order.

        A sample whose logit row is not all finite gets ``num_classes``, the vote for no class. The noise
        is fresh from ``generator``, drawn in batches of ``batch_size`` (one ``method.perturb`` call per
        batch), or the first ``num`` rows of ``noise`` (num, *x.shape). Everything runs on ``device``
        (a generator elsewhere is replaced as the class says). Raises QRobustError when ``base`` returns
        anything but a (batch, num_classes) tensor.
        """
        x, generator = x.to(self.device), generator_on(self.device, generator)
        predictions = torch.empty(num, dtype=torch.int64, device=self.device)
        for start in range(0, num, self.batch_size):
            size = min(self.batch_size, num - start)
            batch = x.unsqueeze(0).expand(size, *x.shape)  # (size, C, H, W), a view until noise is added
            if noise is None:
                inputs = self.method.perturb(batch, generator)
            else:
                inputs = self.method.apply(batch, noise[start : start + size].to(self.device))  # a batch at a time
            logits = self.base(inputs)  # (size, num_classes)
            if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != (size, self.num_classes):
                got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
                raise QRobustError(f"base model must return logits of shape ({size}, {self.num_classes}), got {got}")
            finite = torch.isfinite(logits).all(dim=1)  # (size,)
            predictions[start : start + size] = torch.where(finite, logits.argmax(dim=1), self.num_classes)
        return predictions.cpu().numpy()

    def noise_bank(self, x: torch.Tensor, rows: int) -> torch.Tensor | None:
        """The shared noise of ``rows`` samples shaped like ``x``, drawn once per (rows, shape)."""
        if self.noise_bank_seed is None:
            return None
        key = (rows, *x.shape)
        if self._bank is None or self._bank[0] != key:
            generator = torch.Generator().manual_seed(self.noise_bank_seed)
            self._bank = (key, self.method.sample_noise(key, generator).to(self.device))
        return self._bank[1]


class Estimation:
    """CERTIFY's estimation stage for one input (``SmoothedClassifier.select``): ``draw(k)`` classifies k
    more noisy samples and returns the votes for ``guess`` among them; ``counts`` (num_classes,) and
    ``no_class`` hold the votes of all drawn so far. Draws continue one noise stream (generator or bank),
    so drawing k1 then k2 samples sees the same noise as drawing k1 + k2 at once."""

    def __init__(
        self,
        smoothed: SmoothedClassifier,
        x: torch.Tensor,
        guess: int | None,
        generator: torch.Generator | None,
        bank: torch.Tensor | None,
    ):
        self.guess = guess
        self.counts = np.zeros(smoothed.num_classes, dtype=np.int64)
        self.drawn = 0
        self._smoothed, self._x, self._generator, self._bank = smoothed, x, generator, bank

    @property
    def no_class(self) -> int:
        return self.drawn - int(self.counts.sum())

    def draw(self, k: int) -> int:
        """Classify ``k`` more noisy samples; their votes for ``guess`` (0 when ``guess`` is None)."""
        noise = None if self._bank is None else self._bank[self.drawn : self.drawn + k]
        if self._bank is not None and noise is not None and len(noise) < k:
            raise QRobustError(f"the noise bank holds {len(self._bank)} estimation rows, {self.drawn + k} requested")
        new = self._smoothed.sample_counts(self._x, k, self._generator, noise)
        self.counts += new
        self.drawn += k
        return 0 if self.guess is None else int(new[self.guess])


def count_votes(predictions: np.ndarray, num_classes: int) -> tuple[np.ndarray, int]:
    """The votes of ``predictions`` (num,) from ``sample_predictions``: (counts (num_classes,) int64, the
    number of votes for no class, i.e. of entries equal to ``num_classes``)."""
    counts = np.bincount(predictions, minlength=num_classes + 1)  # (num_classes + 1,)
    return counts[:num_classes], int(counts[num_classes])
