"""Certify or predict many examples of a dataset, one reproducible generator per example."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch

from qrobust.data import LatticeDataset
from qrobust.errors import QRobustError
from qrobust.smoothing.adaptive import certify_adaptive, check_radii, check_sequential
from qrobust.smoothing.confidence import check_alpha, check_count
from qrobust.smoothing.core import SmoothedClassifier
from qrobust.smoothing.records import ABSTAIN, CertifyRow, PredictRow


def example_generator(seed: int, index: int) -> torch.Generator:
    """The noise generator of example ``index`` in a run seeded by ``seed``.

    Seeding per example (not per run) makes each row independent of which examples ran before it,
    so a run can be split, resumed or reordered and still give the same rows.
    """
    check_count("seed", seed, minimum=0)
    (state,) = np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)
    return torch.Generator().manual_seed(int(state))


def example_bound_rng(seed: int, index: int) -> np.random.Generator:
    """The coin of example ``index``'s randomized Clopper-Pearson bound in a run seeded by ``seed``: a
    stream of its own, independent of the example's noise (``example_generator``)."""
    check_count("seed", seed, minimum=0)
    return np.random.default_rng(np.random.SeedSequence([seed, index, 1]))


def certify_examples(
    smoothed: SmoothedClassifier,
    dataset: LatticeDataset,
    indices: Iterable[int],
    *,
    n0: int,
    n: int,
    alpha: float,
    seed: int = 0,
    settle_radii: Sequence[float] | None = None,
    sequential: str = "cs",
    randomized_bound: bool = False,
) -> Iterator[CertifyRow]:
    """Certify ``dataset`` at ``indices`` in order, yielding one row per example as it finishes.

    With ``settle_radii``, each example is certified adaptively (``certify_adaptive``): at most ``n``
    estimation samples, stopping once these radii are decided, by the confidence sequence
    (``sequential="cs"``) or the union-bound schedule (``"union"``, for comparison). With
    ``randomized_bound`` (fixed n only), the bound is randomized Clopper-Pearson with the coin
    ``example_bound_rng(seed, index)`` (``SmoothedClassifier.certificate`` says what it guarantees). The
    arguments are checked here, before the first example (QRobustError).
    """
    _check_run(n=n, n0=n0, alpha=alpha, seed=seed)
    check_sequential(sequential)
    if settle_radii is not None:
        check_radii(settle_radii)
        if randomized_bound:
            raise QRobustError("randomized_bound applies to fixed-n certification, not with settle_radii")
    return _certify_rows(smoothed, dataset, indices, n0, n, alpha, seed, settle_radii, sequential, randomized_bound)


def _certify_rows(
    smoothed: SmoothedClassifier,
    dataset: LatticeDataset,
    indices: Iterable[int],
    n0: int,
    n: int,
    alpha: float,
    seed: int,
    settle_radii: Sequence[float] | None,
    sequential: str,
    randomized_bound: bool,
) -> Iterator[CertifyRow]:
    """The rows of ``certify_examples``, computed as they are iterated."""
    for index in indices:
        started = time.perf_counter()
        x = dataset.images[index]  # (C, H, W) uint8
        generator = example_generator(seed, index)
        if settle_radii is None:
            bound_rng = example_bound_rng(seed, index) if randomized_bound else None
            certificate = smoothed.certify(x, n0=n0, n=n, alpha=alpha, generator=generator, bound_rng=bound_rng)
        else:
            certificate = certify_adaptive(
                smoothed,
                x,
                n0=n0,
                n_max=n,
                alpha=alpha,
                radii=settle_radii,
                sequential=sequential,
                generator=generator,
            )
        label = ABSTAIN if certificate.label is None else certificate.label
        yield CertifyRow(
            index,
            int(dataset.labels[index]),
            label,
            certificate.radius,
            time.perf_counter() - started,
            certificate.samples,
        )


def predict_examples(
    smoothed: SmoothedClassifier,
    dataset: LatticeDataset,
    indices: Iterable[int],
    *,
    n: int,
    alpha: float,
    seed: int = 0,
) -> Iterator[PredictRow]:
    """Predict ``dataset`` at ``indices`` in order, yielding one row per example as it finishes. The
    arguments are checked here, before the first example (QRobustError)."""
    _check_run(n=n, alpha=alpha, seed=seed)
    return _predict_rows(smoothed, dataset, indices, n, alpha, seed)


def _predict_rows(
    smoothed: SmoothedClassifier, dataset: LatticeDataset, indices: Iterable[int], n: int, alpha: float, seed: int
) -> Iterator[PredictRow]:
    """The rows of ``predict_examples``, computed as they are iterated."""
    for index in indices:
        started = time.perf_counter()
        prediction = smoothed.predict(dataset.images[index], n=n, alpha=alpha, generator=example_generator(seed, index))
        label = ABSTAIN if prediction.label is None else prediction.label
        yield PredictRow(index, int(dataset.labels[index]), label, time.perf_counter() - started)


def evenly_spaced(total: int, count: int) -> list[int]:
    """``count`` indices spread evenly over ``range(total)`` (Cohen et al. certify every k-th test image)."""
    if not 1 <= count <= total:
        raise ValueError(f"number of examples must be in [1, {total}], got {count}")
    return [i * total // count for i in range(count)]


def _check_run(alpha: float, seed: int, **counts: int) -> None:
    """Raise QRobustError on a bad sample count, ``alpha`` or ``seed`` of a run."""
    for name, value in counts.items():
        check_count(name, value)
    check_alpha(alpha)
    check_count("seed", seed, minimum=0)
