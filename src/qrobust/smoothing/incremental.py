"""Incremental randomized smoothing (IRS): certify a modified base classifier by reusing the original's
certification (Ugare, Suresh, Banerjee, Singh & Misailovic, "Incremental Randomized Smoothing
Certification", ICLR 2024), as ARQ's quantization-policy search does (Yang et al., "ARQ", 2024).

The original smoothed classifier is certified once with many samples (``certify_original``); the cache
keeps, per input, its certificate (top class c_A, pA_lower), the seed of its noise and the base
classifier's class on every estimation sample. A modified base classifier f_p (quantized, pruned,
fine-tuned) is then certified with few samples (``certify_incremental``): the first n_zeta noise draws
are replayed exactly, the draws where f says c_A but f_p does not are counted, and zeta = their
one-sided Clopper-Pearson upper bound at level alpha_zeta bounds P[f(x + e) = c_A != f_p(x + e)].
Since P[f_p(x + e) = c_A] >= P[f(x + e) = c_A] - P[f(x + e) = c_A != f_p(x + e)] >= pA_lower - zeta,
the radius sigma * Phi^-1(pA_lower - zeta) is certified when pA_lower - zeta > 1/2. The paper counts
every disagreement f != f_p; only those leaving c_A can lower P[f_p = c_A], so counting them alone is
as sound and never looser. When pA_lower >= gamma the radius is too sensitive to that subtraction
(Phi^-1 is steep near 1), and IRS falls back to certifying f_p from scratch: with n_zeta fresh samples
as in the paper, or with ``n_fallback`` of them (e.g. the original's n, to keep its large radii: a
confident input's radius is capped by its sample count whatever the method). The direction is checked
against the reference implementation (github.com/uiuc-arc/Incremental-DNN-Verification,
``Smooth.certify_with_cache``: incremental if pA < gamma, else plain RS; gamma 0.99 on CIFAR-10 and
0.995 on ImageNet).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.special import ndtri

from qrobust.errors import QRobustError
from qrobust.smoothing.confidence import check_alpha, check_count, clopper_pearson_lower
from qrobust.smoothing.core import Certificate, SmoothedClassifier, count_votes
from qrobust.smoothing.methods import SmoothingMethod
from qrobust.smoothing.metrics import DEFAULT_RADII, CertifiedSummary, summarize
from qrobust.smoothing.run import example_generator

FALLBACK_STREAM = 1  # SeedSequence word that separates the fallback's noise from the original's stream


@dataclass(frozen=True)
class IncrementalCertificate(Certificate):
    """A certificate of the modified smoothed classifier, from ``certify_incremental``.

    ``p_lower`` is pA_lower - zeta (clipped at 0) on the incremental path and the fresh Clopper-Pearson
    bound on the fallback path; ``counts`` are the modified model's votes on its n_zeta samples (all
    zero when the original abstained, as nothing is sampled then).
    """

    zeta: float | None  # (1 - alpha_zeta) upper bound on P[f(x + e) = c_A != f_p(x + e)]; None when not estimated
    fallback: bool  # True: certified from scratch (cached pA_lower >= gamma)


@dataclass(frozen=True)
class CertificationCache:
    """What IRS reuses from the certification of the original smoothed classifier on N inputs.

    Input i was certified like ``SmoothedClassifier.certify`` with the generator
    ``example_generator(seed, i)``: n0 selection samples, then n estimation samples, drawn in batches of
    ``batch_size`` by ``method.sample_noise``, which ``replay_noise`` redraws bit for bit.
    """

    images: torch.Tensor  # (N, C, H, W), uint8 lattice or float in [0, 1]
    certificates: tuple[Certificate, ...]  # (N,) of the original smoothed classifier
    predictions: np.ndarray  # (N, n) original base classifier's class on each estimation sample, in draw order
    # (num_classes for a sample with non-finite logits, a vote for no class)
    method: SmoothingMethod
    num_classes: int
    n0: int
    alpha: float
    seed: int
    batch_size: int

    @property
    def n(self) -> int:
        """Estimation samples per input of the original certification."""
        return self.predictions.shape[1]

    def replay_noise(self, index: int, num: int) -> torch.Tensor:
        """The noise of the first ``num`` (<= n) estimation samples of input ``index``: (num, C, H, W),
        identical to the original run's, by redrawing its selection and estimation batches in order."""
        if not 1 <= num <= self.n:
            raise ValueError(f"num must be in [1, n={self.n}], got {num}")
        generator = example_generator(self.seed, index)
        shape = tuple(self.images.shape[1:])
        for size in _batch_sizes(self.n0, self.batch_size):  # the selection draws, discarded
            self.method.sample_noise((size, *shape), generator)
        batches = _batch_sizes(self.n, self.batch_size)[: -(-num // self.batch_size)]  # those holding rows < num
        return torch.cat([self.method.sample_noise((size, *shape), generator) for size in batches])[:num]


def certify_original(
    smoothed: SmoothedClassifier, images: torch.Tensor, *, n0: int, n: int, alpha: float, seed: int = 0
) -> CertificationCache:
    """Certify the original smoothed classifier on ``images`` (N, C, H, W) and cache what IRS reuses.

    Each certificate is exactly ``smoothed.certify(images[i], n0, n, alpha, example_generator(seed, i))``
    (as ``certify_examples`` computes it): with probability >= 1 - alpha, g is constant within l2
    ``radius`` ([0, 1] pixel units) of images[i]. The classifier must draw its noise from the per-input
    generator, so ``noise_bank_seed`` must be None.
    """
    check_count("n0", n0)
    check_count("n", n)
    check_alpha(alpha)
    if smoothed.noise_bank_seed is not None:
        raise ValueError("IRS replays per-input noise: the original classifier's noise_bank_seed must be None")
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or len(images) == 0:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise QRobustError(f"images must be a non-empty (N, C, H, W) tensor, got {shape}")
    for x in images:
        smoothed.method.check_image(x)
    certificates, predictions = [], []
    for index, x in enumerate(images):
        generator = example_generator(seed, index)
        guess = smoothed.top_class(smoothed.sample_counts(x, n0, generator))
        votes = smoothed.sample_predictions(x, n, generator)  # (n,)
        counts, no_class = count_votes(votes, smoothed.num_classes)
        certificates.append(smoothed.certificate(guess, counts, alpha, no_class))
        predictions.append(votes.astype(np.min_scalar_type(smoothed.num_classes)))
    return CertificationCache(
        images,
        tuple(certificates),
        np.stack(predictions),
        smoothed.method,
        smoothed.num_classes,
        n0,
        alpha,
        seed,
        smoothed.batch_size,
    )


def certify_incremental(
    cache: CertificationCache,
    modified: SmoothedClassifier,
    *,
    n_zeta: int,
    alpha_zeta: float,
    gamma: float,
    n_fallback: int | None = None,
    seed: int = 0,
) -> list[IncrementalCertificate]:
    """IRS (Algorithm 2 of Ugare et al.): certify the modified smoothed classifier on every cached input.

    Per input, with pA_lower and c_A the cached original certificate:
      * pA_lower >= ``gamma`` (the paper's direction: IRS is used below gamma): fall back to a fresh
        certification of ``modified`` with the cache's n0 selection and ``n_fallback`` (default
        ``n_zeta``) estimation samples, drawn from a stream independent of the original's (chosen by
        ``seed``), at the cache's level alpha. The reference code runs it at alpha + alpha_zeta (and
        n0 = n_zeta // 10); since the route depends on the cached sample, the argument below then bounds
        the failure only by alpha + 2 alpha_zeta, while level alpha keeps it at alpha + alpha_zeta.
        The paper's gamma is 0.99; a lower one (0.9-0.95) with ``n_fallback`` = the cached n sends more
        confident inputs, whose radius suffers most from subtracting zeta, to the fallback: slower, but
        closer to re-running RS (measured in results/arq/README.md).
      * the original abstained: abstain without sampling (pA_lower - zeta <= pA_lower <= 1/2).
      * otherwise: replay the first ``n_zeta`` estimation noise draws, zeta = one-sided Clopper-Pearson
        upper bound at level ``alpha_zeta`` on the rate of draws that f sends to c_A and f_p elsewhere;
        certify c_A with radius sigma * Phi^-1(pA_lower - zeta) if pA_lower - zeta > 1/2, else abstain.

    Guarantee: for each input, with probability at least 1 - alpha - alpha_zeta over the original
    certification, the replayed comparison and the fallback's noise, a returned certificate that is not
    abstained is correct: the modified smoothed classifier g_p(x') = argmax_c P[f_p(x' + e) = c] equals
    ``label`` for every x' with ||x' - x||_2 <= ``radius`` ([0, 1] pixel units; lattice points x' for
    IntRS, whose Cohen radius is sound by ``qrobust.smoothing.lattice``). Proof: let A = {pA_lower >
    P[f(x + e) = c_A]} (probability <= alpha) and Z = {zeta < P[f(x + e) != f_p(x + e)]} (<= alpha_zeta);
    an incremental certificate can only be wrong on A or Z, a fallback one on its own failure F (<= alpha,
    independent of the route). If P[f(x + e) = c_A] < gamma, falling back implies A, so
    P[fail] <= P[A, no fallback] + P[Z] + alpha P[fallback] <= alpha + alpha_zeta; otherwise no
    incremental certificate fails on A and P[fail] <= P[Z] + alpha. A sample on which f or f_p returns
    non-finite logits is a vote for no class (``SmoothedClassifier``): a replayed draw where f says c_A
    and f_p has no class counts as a departure, so such outputs only raise zeta.

    ``modified`` must draw the same noise as the cached classifier (same kind and sigma: FloatRS and
    FloatRSQuant share it) and have the same classes; its base model and how it reads noisy inputs may
    differ. The incremental radius is the Gaussian one for every method (for IntRS slightly below its
    exact table).
    """
    check_count("n_zeta", n_zeta)
    n_fallback = n_zeta if n_fallback is None else n_fallback
    check_count("n_fallback", n_fallback)
    if n_zeta > cache.n:
        raise ValueError(f"n_zeta must be <= the cached n={cache.n} (only those draws can be replayed), got {n_zeta}")
    check_alpha(alpha_zeta, "alpha_zeta")
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma!r}")
    if modified.num_classes != cache.num_classes:
        raise ValueError(
            f"modified classifier must have {cache.num_classes} classes like the original, got {modified.num_classes}"
        )
    if not _same_noise(cache.method, modified.method, tuple(cache.images.shape[1:])):
        raise ValueError(
            f"modified classifier must draw the same noise as the original, got {modified.method} and {cache.method}"
        )
    results = []
    for index, (x, cached) in enumerate(zip(cache.images, cache.certificates, strict=True)):
        if cached.p_lower >= gamma:
            fresh = modified.certify(x, cache.n0, n_fallback, cache.alpha, _fallback_generator(cache.seed, index, seed))
            results.append(
                IncrementalCertificate(
                    fresh.label, fresh.radius, fresh.p_lower, fresh.counts, None, True, no_class=fresh.no_class
                )
            )
        elif cached.abstained:
            nothing = np.zeros(cache.num_classes, dtype=np.int64)
            results.append(IncrementalCertificate(None, 0.0, cached.p_lower, nothing, None, False))
        else:
            votes = modified.sample_predictions(x, n_zeta, noise=cache.replay_noise(index, n_zeta))  # (n_zeta,)
            original = cache.predictions[index, :n_zeta]
            departures = int(np.count_nonzero((original == cached.label) & (votes != cached.label)))
            zeta = 1.0 - clopper_pearson_lower(n_zeta - departures, n_zeta, alpha_zeta)  # upper bound
            p_lower = max(0.0, cached.p_lower - zeta)
            counts, no_class = count_votes(votes, cache.num_classes)
            if p_lower > 0.5:
                label, radius = cached.label, modified.method.sigma * float(ndtri(p_lower))
            else:
                label, radius = None, 0.0
            results.append(IncrementalCertificate(label, radius, p_lower, counts, zeta, False, no_class=no_class))
    return results


def summarize_certificates(
    certificates: Sequence[Certificate],
    labels: Sequence[int] | np.ndarray | torch.Tensor,
    radii: Sequence[float] = DEFAULT_RADII,
) -> CertifiedSummary:
    """``summarize`` of certificates against their true ``labels``: certified accuracy at ``radii`` and ACR."""
    labels = np.asarray(labels)
    if len(certificates) != len(labels):
        raise ValueError(f"need one label per certificate, got {len(labels)} for {len(certificates)} certificates")
    radius = np.array([c.radius for c in certificates], dtype=float)
    abstained = np.array([c.abstained for c in certificates], dtype=bool)
    correct = np.array([c.label == int(y) for c, y in zip(certificates, labels, strict=True)], dtype=bool)
    return summarize(radius, correct, abstained, radii)


def acr(certificates: Sequence[Certificate], labels: Sequence[int] | np.ndarray | torch.Tensor) -> float:
    """Average certified radius: the sum of radii of certificates with the correct label, over N."""
    return summarize_certificates(certificates, labels).average_certified_radius


def _batch_sizes(num: int, batch_size: int) -> list[int]:
    """The sizes of the batches ``SmoothedClassifier.sample_predictions`` draws ``num`` samples in."""
    return [min(batch_size, num - start) for start in range(0, num, batch_size)]


def _same_noise(a: SmoothingMethod, b: SmoothingMethod, shape: tuple[int, ...]) -> bool:
    """Whether two methods draw identical noise from identically seeded generators (checked on one draw)."""
    first, second = (method.sample_noise((2, *shape), torch.Generator().manual_seed(0)) for method in (a, b))
    return first.dtype == second.dtype and torch.equal(first, second)


def _fallback_generator(seed: int, index: int, fallback_seed: int) -> torch.Generator:
    """The fallback's generator for input ``index``: a SeedSequence stream that never equals
    ``example_generator(seed, index)``'s (whose entropy words are [seed, index], i.e. [seed, index, 0, 0])."""
    (state,) = np.random.SeedSequence([seed, index, FALLBACK_STREAM, fallback_seed]).generate_state(1, dtype=np.uint64)
    return torch.Generator().manual_seed(int(state))
