"""Base models with non-finite or malformed logits never yield a certificate that the finite votes do not back.

A logit row with NaN or +-inf anywhere is a vote for no class: it counts among the n samples but for no
class, so it can only lower pA. Output of the wrong shape (e.g. 12 logits for 10 classes) is refused.
"""

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm
from torch import nn

from qrobust.data import LatticeDataset
from qrobust.errors import QRobustError
from qrobust.smoothing import (
    FloatRS,
    FloatRSQuant,
    IntRS,
    SmoothedClassifier,
    certify_examples,
    certify_incremental,
    certify_original,
    example_generator,
    predict_examples,
)
from qrobust.smoothing.adaptive import certify_adaptive
from qrobust.smoothing.confidence import clopper_pearson_lower
from qrobust.smoothing.methods import radius_map_for
from qrobust.smoothing.sequential import cs_lower

SHAPE = (1, 2, 2)
NAN, INF = float("nan"), float("inf")


class Constant(nn.Module):
    """Returns ``row`` (width,) for every input."""

    def __init__(self, row: list[float]):
        super().__init__()
        self.register_buffer("row", torch.tensor(row))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.row.expand(len(x), -1).clone()  # (B, width)


class CleanOnly(nn.Module):
    """Votes for class 2 of 3 on the clean image and returns NaN logits on every other (noisy) input."""

    def __init__(self, clean: torch.Tensor):
        super().__init__()
        self.register_buffer("clean", clean)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.full((len(x), 3), NAN)
        logits[(x == self.clean).flatten(1).all(dim=1)] = torch.tensor([0.0, 0.0, 1.0])
        return logits  # (B, 3)


class Hashed(nn.Module):
    """A deterministic base model that, per input, returns finite logits of class c with probability ``probs[c]``
    and otherwise (probability 1 - sum(probs)) a non-finite row that points at class ``target``: NaN at
    ``target``, +inf at ``target``, or -inf everywhere but ``target`` (chosen by the same hash). The choice is a
    function of the input alone, u = frac(9973 |<input, w>|) for a fixed random w. Records its outputs."""

    def __init__(self, probs: np.ndarray, width: int, target: int, seed: int):
        super().__init__()
        self.register_buffer("edges", torch.tensor(np.cumsum(probs), dtype=torch.float64))  # (K,)
        self.register_buffer("w", torch.randn(math.prod(SHAPE), generator=torch.Generator().manual_seed(seed)).double())
        self.width, self.target, self.seen = width, target, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = torch.frac((x.flatten(1).double() @ self.w).abs() * 9973.0)  # (B,) in [0, 1)
        votes = torch.searchsorted(self.edges, u, right=True)  # (B,) in [0, K]; K: a non-finite row
        logits = torch.full((len(x), self.width), -1.0)
        logits[torch.arange(len(x)), votes.clamp(max=self.width - 1)] = 1.0
        faulty, kind = votes == len(self.edges), (u * 1e6).long() % 3
        logits[faulty & (kind == 0), self.target] = NAN
        logits[faulty & (kind == 1), self.target] = INF
        minus = faulty & (kind == 2)
        logits[minus] = -INF
        logits[minus, self.target] = 5.0
        self.seen.append(logits.clone())
        return logits  # (B, width)


def _votes(logits: torch.Tensor) -> torch.Tensor:
    """The reference vote of each row (B, K) of logits: its argmax if all finite, else -1 (no class)."""
    return torch.where(torch.isfinite(logits).all(dim=1), logits.argmax(dim=1), -1)


def _finite_votes(logits: torch.Tensor, num_classes: int) -> tuple[np.ndarray, int]:
    """The reference count: (votes per class of the all-finite rows, number of other rows)."""
    votes = _votes(logits).numpy()
    return np.bincount(votes[votes >= 0], minlength=num_classes), int((votes < 0).sum())


def _image(seed: int = 0) -> torch.Tensor:
    return torch.rand(SHAPE, generator=torch.Generator().manual_seed(seed))


NON_FINITE = {
    "all NaN": [NAN, NAN, NAN],
    "all +inf": [INF, INF, INF],
    "+inf at class 1": [0.0, INF, 0.0],
    "-inf at classes 0 and 2": [-INF, 1.0, -INF],
}


@pytest.mark.parametrize("row", NON_FINITE.values(), ids=NON_FINITE.keys())
@pytest.mark.parametrize("method", [FloatRS(0.25), FloatRSQuant(0.25), IntRS(0.25)], ids=lambda m: m.name)
def test_non_finite_logits_never_certify(row, method):
    """Old behaviour: class 0 (argmax of NaN) or the +inf class, with the largest radius n allows."""
    smoothed = SmoothedClassifier(Constant(row), 3, method, batch_size=64)
    x = (_image() * 255).round().to(torch.uint8)
    certificate = smoothed.certify(x, n0=20, n=200, alpha=0.01, generator=torch.Generator().manual_seed(0))
    assert certificate.abstained and certificate.radius == 0.0
    assert certificate.counts.tolist() == [0, 0, 0] and certificate.no_class == 200
    prediction = smoothed.predict(x, n=200, alpha=0.01, generator=torch.Generator().manual_seed(0))
    assert prediction.abstained and prediction.no_class == 200
    for sequential in ("cs", "union"):
        adaptive = certify_adaptive(
            smoothed,
            x,
            n0=20,
            n_max=400,
            alpha=0.01,
            radii=(0.25,),
            sequential=sequential,
            generator=torch.Generator().manual_seed(0),
        )
        assert adaptive.abstained


def test_nan_only_on_noisy_inputs_never_certifies():
    """A model that is fine on the clean image and NaN under noise has no finite vote to certify."""
    x = _image(1)
    smoothed = SmoothedClassifier(CleanOnly(x), 3, FloatRS(0.25))
    assert smoothed.base(x[None]).argmax().item() == 2  # finite on the clean image
    certificate = smoothed.certify(x, n0=20, n=300, alpha=0.01, generator=torch.Generator().manual_seed(0))
    assert certificate.abstained and certificate.no_class == 300
    assert smoothed.predict(x, n=300, alpha=0.01, generator=torch.Generator().manual_seed(0)).abstained


def test_non_finite_rows_on_a_random_subset_count_for_no_class():
    """Half the noisy samples are NaN/inf rows pointing at class 0; class 0 has 30% of the finite-row mass
    overall and class 1 20%: counting the faulty rows as class 0 would certify it with pA near 0.8."""
    probs = np.array([0.3, 0.2, 0.0])
    smoothed = SmoothedClassifier(Hashed(probs, 3, target=0, seed=0), 3, FloatRS(0.25), batch_size=100)
    x = _image(2)
    certificate = smoothed.certify(x, n0=50, n=1000, alpha=0.01, generator=torch.Generator().manual_seed(0))
    assert certificate.abstained
    assert 400 < certificate.no_class < 600 and certificate.counts.sum() + certificate.no_class == 1000
    assert smoothed.predict(x, n=1000, alpha=0.01, generator=torch.Generator().manual_seed(1)).abstained
    for sequential in ("cs", "union"):
        adaptive = certify_adaptive(
            smoothed,
            x,
            n0=50,
            n_max=2000,
            alpha=0.01,
            radii=(0.1,),
            sequential=sequential,
            generator=torch.Generator().manual_seed(2),
        )
        assert adaptive.abstained


def test_no_class_votes_lower_the_radius_but_keep_the_class():
    """90% class 1 and 10% non-finite rows pointing at class 1: certified, with the radius of the finite votes."""
    model = Hashed(np.array([0.0, 0.9]), 2, target=1, seed=1)
    smoothed = SmoothedClassifier(model, 2, FloatRS(0.25), batch_size=128)
    certificate = smoothed.certify(_image(3), n0=50, n=1000, alpha=0.01, generator=torch.Generator().manual_seed(0))
    counts, no_class = _finite_votes(torch.cat(model.seen)[50:], 2)
    assert certificate.label == 1 and certificate.radius == FloatRS(0.25).radius(int(counts[1]), 1000, 0.01)
    assert certificate.no_class == no_class > 50


WRONG_SHAPES = {
    "12 logits for 10 classes": lambda x: torch.arange(12.0).expand(len(x), 12),  # class 11 wins
    "8 logits for 10 classes": lambda x: torch.arange(8.0).expand(len(x), 8),
    "a score per input": lambda x: torch.zeros(len(x)),
    "one row for the batch": lambda x: torch.zeros(1, 10),
    "a tuple": lambda x: (torch.zeros(len(x), 10),),
}


class Lambda(nn.Module):
    def __init__(self, function):
        super().__init__()
        self.function = function

    def forward(self, x):
        return self.function(x)


@pytest.mark.parametrize("output", WRONG_SHAPES.values(), ids=WRONG_SHAPES.keys())
def test_output_of_the_wrong_shape_is_refused(output):
    smoothed = SmoothedClassifier(Lambda(output), 10, FloatRS(0.25), batch_size=16)
    x = _image()
    with pytest.raises(QRobustError, match=r"base model must return logits of shape \(16, 10\)"):
        smoothed.certify(x, n0=20, n=100, alpha=0.01)
    with pytest.raises(QRobustError, match="base model must return logits"):
        smoothed.predict(x, n=100, alpha=0.01)
    with pytest.raises(QRobustError, match="base model must return logits"):
        certify_adaptive(smoothed, x, n0=20, n_max=100, alpha=0.01, radii=(0.1,))
    with pytest.raises(QRobustError, match="base model must return logits"):
        certify_original(smoothed, x[None], n0=20, n=100, alpha=0.01)


def test_irs_counts_non_finite_rows_of_the_modified_model_as_departures(linear_binary):
    """The original certifies class 0 (NaN's argmax); a modified model that returns only NaN must not inherit it."""
    x = torch.tensor([0.0, 0.3, 0.5, 0.5]).reshape(SHAPE)  # margin -0.34: class 0 with p = 0.91
    original = SmoothedClassifier(linear_binary, 2, FloatRS(0.25), batch_size=100)
    cache = certify_original(original, x[None], n0=50, n=1000, alpha=0.01)
    assert cache.certificates[0].label == 0 and cache.certificates[0].p_lower < 0.99
    modified = SmoothedClassifier(Constant([NAN, NAN]), 2, FloatRS(0.25), batch_size=100)
    (certificate,) = certify_incremental(cache, modified, n_zeta=200, alpha_zeta=0.01, gamma=0.99)
    assert certificate.abstained and not certificate.fallback and certificate.no_class == 200
    (fallback,) = certify_incremental(cache, modified, n_zeta=200, alpha_zeta=0.01, gamma=0.5)
    assert fallback.abstained and fallback.fallback


def test_irs_original_with_non_finite_rows_abstains():
    smoothed = SmoothedClassifier(Constant([NAN, 1.0, 0.0]), 3, FloatRS(0.25), batch_size=100)
    cache = certify_original(smoothed, _image()[None], n0=20, n=100, alpha=0.01)
    assert cache.certificates[0].abstained and cache.certificates[0].no_class == 100
    assert (cache.predictions == 3).all()  # num_classes marks a vote for no class


def test_property_no_certificate_exceeds_what_the_finite_votes_support():
    """Random base models that emit NaN/+inf/-inf rows on random subsets of noisy samples: every certificate's
    class exists and has finite selection votes, and no radius exceeds the method's radius for the label's
    finite votes among all n samples; output of the wrong width is refused. The cases must exercise all
    of this: certificates resting partly on faulty rows, abstentions and refusals."""
    outcomes = [_property_case(case) for case in range(200)]
    assert outcomes.count("refused") >= 10 and outcomes.count("abstained") >= 20
    assert outcomes.count("certified") >= 10 and outcomes.count("certified despite faulty rows") >= 15


def _property_case(case: int) -> str:
    """One random model of the property test; returns what happened to its certify call."""
    rng = np.random.default_rng([16, case])
    num_classes = int(rng.integers(2, 11))
    width = num_classes + int(rng.choice([-1, 1, 2])) if rng.random() < 0.1 else num_classes
    finite = min(1.0, rng.uniform(0.4, 1.2))  # share of finite rows (all of them in a quarter of the cases)
    probs = finite * rng.dirichlet(np.full(num_classes, 0.3))
    model = Hashed(probs, width, target=int(rng.integers(width)), seed=case)
    method = [FloatRS(0.25), FloatRSQuant(0.5), IntRS(0.25)][case % 3]
    x = _image(case) if case % 3 == 0 else (_image(case) * 255).round().to(torch.uint8)
    n0, n, alpha = int(rng.integers(10, 60)), int(rng.integers(100, 400)), float(rng.choice([0.001, 0.01, 0.1]))
    smoothed = SmoothedClassifier(model, num_classes, method, batch_size=int(rng.integers(16, 128)))
    generator = torch.Generator().manual_seed(case)
    if width != num_classes:
        with pytest.raises(QRobustError, match="base model must return logits"):
            smoothed.certify(x, n0=n0, n=n, alpha=alpha, generator=generator)
        with pytest.raises(QRobustError, match="base model must return logits"):
            smoothed.predict(x, n=n, alpha=alpha, generator=generator)
        return "refused"

    certificate = smoothed.certify(x, n0=n0, n=n, alpha=alpha, generator=generator)
    seen = torch.cat(model.seen)  # (n0 + n, K): selection rows, then estimation rows
    selection, _ = _finite_votes(seen[:n0], num_classes)
    counts, no_class = _finite_votes(seen[n0:], num_classes)
    if not certificate.abstained:
        assert 0 <= certificate.label < num_classes and selection[certificate.label] > 0, case
        supported = method.radius(int(counts[certificate.label]), n, alpha)  # None: no certificate at all
        assert supported is not None and certificate.radius <= supported, case
    assert np.array_equal(certificate.counts, counts) and certificate.no_class == no_class, case

    model.seen.clear()
    adaptive = certify_adaptive(smoothed, x, n0=n0, n_max=n, alpha=alpha, radii=(0.1, 0.25), generator=generator)
    seen = torch.cat(model.seen)  # selection rows, then the estimation rows actually drawn
    selection, _ = _finite_votes(seen[:n0], num_classes)
    counts, no_class = _finite_votes(seen[n0:], num_classes)
    assert np.array_equal(adaptive.counts, counts) and adaptive.no_class == no_class, case
    assert adaptive.samples == len(seen) - n0 <= n, case
    if not adaptive.abstained:
        assert 0 <= adaptive.label < num_classes and selection[adaptive.label] > 0, case
        looks = [*range(smoothed.batch_size, adaptive.samples, smoothed.batch_size), adaptive.samples]
        votes = [_finite_votes(seen[n0 : n0 + look], num_classes)[0][adaptive.label] for look in looks]
        assert adaptive.p_lower <= max(cs_lower(votes, looks, alpha)) + 1e-9, case  # the best bound seen at a look
        supported = radius_map_for(method).radius(adaptive.p_lower)
        assert supported is not None and adaptive.radius <= supported + 1e-9, case

    model.seen.clear()
    prediction = smoothed.predict(x, n=n, alpha=alpha, generator=generator)
    counts, no_class = _finite_votes(torch.cat(model.seen), num_classes)
    if not prediction.abstained:  # the top outcome, strictly ahead of every other class and of "no class"
        others = np.delete(counts, prediction.label)
        assert 0 <= prediction.label < num_classes and counts[prediction.label] > max(others.max(), no_class), case
    if certificate.abstained:
        return "abstained"
    return "certified despite faulty rows" if certificate.no_class else "certified"


def test_property_irs_never_exceeds_what_the_finite_votes_support():
    """IRS with random faulty original and modified models (sharing the hash, so faults of one fall on votes of
    the other): every certificate's class exists, and no radius exceeds sigma Phi^-1(pA_lower - zeta) with
    pA_lower and zeta from the finite votes alone (a non-finite row of f_p departs from c_A) or, on the
    fallback, the plain certificate of the finite votes."""
    outcomes = [route for case in range(40) for route in _irs_property_case(case)]
    assert outcomes.count("incremental") >= 20 and outcomes.count("fallback") >= 5


def _irs_property_case(case: int) -> list[str]:
    """One random pair of models on 4 inputs; returns the route of each certificate ("abstained" if none)."""
    rng = np.random.default_rng([17, case])
    num_classes, sigma, n0, n, n_zeta = int(rng.integers(2, 6)), 0.25, 20, 400, 200
    alpha, alpha_zeta, gamma = 0.01, 0.01, float(rng.uniform(0.7, 1.0))

    probs = rng.dirichlet(np.full(num_classes, 0.3))
    original, modified = (
        Hashed(min(1.0, rng.uniform(low, 1.2)) * probs, num_classes, int(rng.integers(num_classes)), seed=case)
        for low in (0.9, 0.7)
    )  # the modified model: the same votes, shifted by its faults, where more inputs are faulty
    images = torch.rand(4, *SHAPE, generator=torch.Generator().manual_seed(case))
    cache = certify_original(SmoothedClassifier(original, num_classes, FloatRS(sigma)), images, n0=n0, n=n, alpha=alpha)
    modified_smoothed = SmoothedClassifier(modified, num_classes, FloatRS(sigma))
    certificates = certify_incremental(cache, modified_smoothed, n_zeta=n_zeta, alpha_zeta=alpha_zeta, gamma=gamma)
    before = torch.cat(original.seen).split(n0 + n)  # per input
    after = torch.cat([torch.empty(0, num_classes), *modified.seen])  # in call order; nothing when all abstain
    routes, used = [], 0
    for cached, certificate, rows in zip(cache.certificates, certificates, before, strict=True):
        if certificate.fallback:
            fresh, used = after[used : used + n0 + n_zeta], used + n0 + n_zeta
            counts, _ = _finite_votes(fresh[n0:], num_classes)
            label = certificate.label
            supported = None if label is None else FloatRS(sigma).radius(int(counts[label]), n_zeta, alpha)
        elif cached.abstained:
            supported = None
        else:
            replayed, used = after[used : used + n_zeta], used + n_zeta
            departures = int(
                ((_votes(rows[n0 : n0 + n_zeta]) == cached.label) & (_votes(replayed) != cached.label)).sum()
            )
            zeta = 1.0 - clopper_pearson_lower(n_zeta - departures, n_zeta, alpha_zeta)
            counts, _ = _finite_votes(rows[n0:], num_classes)
            p_lower = clopper_pearson_lower(int(counts[cached.label]), n, alpha) - zeta
            supported = sigma * float(norm.ppf(p_lower)) if p_lower > 0.5 else None
        if not certificate.abstained:
            assert 0 <= certificate.label < num_classes, case
            assert supported is not None and certificate.radius <= supported, case
        routes.append("abstained" if certificate.abstained else "fallback" if certificate.fallback else "incremental")
    assert used == len(after), case
    return routes


def _dataset(info) -> LatticeDataset:
    images = torch.randint(0, 256, (2, *SHAPE), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return LatticeDataset(images, torch.tensor([0, 1]), info)


@pytest.mark.parametrize(
    ("x", "message"),
    [
        (
            _image().double(),
            "uint8 lattice image or a float32 image in \\[0, 1\\] for float-fp smoothing, got dtype torch.float64",
        ),
        (_image().half(), "got dtype torch.float16"),
        (_image()[None], r"\(C, H, W\) image tensor, got \(1, 1, 2, 2\)"),
        (_image().flatten(), r"\(C, H, W\) image tensor, got \(4,\)"),
        (_image().numpy(), r"\(C, H, W\) image tensor, got ndarray"),
    ],
)
def test_entry_points_refuse_images_the_method_does_not_take(linear_binary, x, message):
    smoothed = SmoothedClassifier(linear_binary, 2, FloatRS(0.25))
    with pytest.raises(QRobustError, match=message):
        smoothed.certify(x, n0=10, n=10, alpha=0.01)
    with pytest.raises(QRobustError, match=message):
        smoothed.predict(x, n=10, alpha=0.01)
    with pytest.raises(QRobustError, match=message):
        certify_adaptive(smoothed, x, n0=10, n_max=10, alpha=0.01, radii=(0.1,))


def test_intrs_refuses_float_images(linear_binary):
    smoothed = SmoothedClassifier(linear_binary, 2, IntRS(0.25))
    with pytest.raises(
        QRobustError, match=r"x must be a uint8 lattice image for int smoothing, got dtype torch\.float32"
    ):
        smoothed.certify(_image(), n0=10, n=10, alpha=0.01)
    with pytest.raises(QRobustError, match="uint8 lattice image for int smoothing"):
        certify_original(smoothed, _image()[None], n0=10, n=10, alpha=0.01)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"n": 100.0}, "n must be an integer >= 1, got 100.0"),
        ({"n": True}, "n must be an integer >= 1, got True"),
        ({"n0": 10.0}, "n0 must be an integer >= 1, got 10.0"),
        ({"n0": False}, "n0 must be an integer >= 1, got False"),
        ({"n": "100"}, "n must be an integer >= 1, got '100'"),
        ({"alpha": "0.01"}, "alpha must be in \\(0, 1\\), got '0.01'"),
        ({"alpha": float("nan")}, "alpha must be in \\(0, 1\\), got nan"),
    ],
)
def test_entry_points_refuse_counts_that_are_not_integers(linear_binary, tiny_info, arguments, message):
    smoothed = SmoothedClassifier(linear_binary, 2, FloatRS(0.25))
    options = {"n0": 10, "n": 100, "alpha": 0.01} | arguments
    with pytest.raises(QRobustError, match=message):
        smoothed.certify(_image(), **options)
    with pytest.raises(QRobustError, match=message):
        certify_original(smoothed, _image()[None], **options)
    with pytest.raises(QRobustError, match=message):
        certify_examples(smoothed, _dataset(tiny_info), [0], **options)  # at the call, before iterating
    if "n0" not in arguments:
        with pytest.raises(QRobustError, match=message):
            smoothed.predict(_image(), n=options["n"], alpha=options["alpha"])
        with pytest.raises(QRobustError, match=message):
            predict_examples(smoothed, _dataset(tiny_info), [0], n=options["n"], alpha=options["alpha"])


def test_numpy_integers_are_counts(linear_binary):
    smoothed = SmoothedClassifier(linear_binary, np.int64(2), FloatRS(0.25), batch_size=np.int32(16))
    plain = smoothed.certify(_image(), n0=10, n=100, alpha=0.01, generator=torch.Generator().manual_seed(0))
    numpy = smoothed.certify(
        _image(), n0=np.int64(10), n=np.int32(100), alpha=np.float64(0.01), generator=torch.Generator().manual_seed(0)
    )
    assert (plain.label, plain.radius) == (numpy.label, numpy.radius)


@pytest.mark.parametrize(
    ("seed", "message"), [(-1, "seed must be an integer >= 0, got -1"), (1.0, "seed must be an integer >= 0, got 1.0")]
)
def test_run_refuses_a_bad_seed(linear_binary, tiny_info, seed, message):
    smoothed = SmoothedClassifier(linear_binary, 2, FloatRS(0.25))
    with pytest.raises(QRobustError, match=message):
        certify_examples(smoothed, _dataset(tiny_info), [0], n0=10, n=100, alpha=0.01, seed=seed)
    with pytest.raises(QRobustError, match=message):
        predict_examples(smoothed, _dataset(tiny_info), [0], n=100, alpha=0.01, seed=seed)
    with pytest.raises(QRobustError, match=message):
        example_generator(seed, 0)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"num_classes": 10.0}, "num_classes must be an integer >= 2"),
        ({"batch_size": 0}, "batch_size must be an integer >= 1"),
    ],
)
def test_classifier_refuses_bad_sizes(linear_binary, arguments, message):
    with pytest.raises(QRobustError, match=message):
        SmoothedClassifier(linear_binary, method=FloatRS(0.25), **({"num_classes": 2} | arguments))
