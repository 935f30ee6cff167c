import numpy as np
import pytest
import torch
from scipy import stats

from qrobust.errors import QRobustError
from qrobust.smoothing import FloatRS, IntRS, SmoothedClassifier, clopper_pearson_lower


@pytest.mark.parametrize(
    ("successes", "trials"), [(1, 10), (50, 100), (99, 100), (100, 100), (997, 1000), (3, 100_000)]
)
@pytest.mark.parametrize("alpha", [0.001, 0.05])
def test_clopper_pearson_matches_scipy_exact_interval(successes, trials, alpha):
    expected = stats.binomtest(successes, trials, alternative="greater").proportion_ci(1 - alpha, method="exact").low
    assert clopper_pearson_lower(successes, trials, alpha) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_clopper_pearson_edge_cases():
    assert clopper_pearson_lower(0, 10, 0.05) == 0.0
    with pytest.raises(ValueError, match="successes"):
        clopper_pearson_lower(11, 10, 0.05)
    with pytest.raises(ValueError, match="alpha"):
        clopper_pearson_lower(5, 10, 1.0)


def _point(margin_direction: float) -> torch.Tensor:
    """An input in [0, 1] whose linear score is ``margin_direction`` for the fixture classifier."""
    # w = (0.6, -0.8, 0, 0), b = -0.1: score = 0.6 a - 0.8 c - 0.1 for x = (a, c, 0.5, 0.5)
    a = 1.0 if margin_direction >= 0 else 0.0
    c = (0.6 * a - 0.1 - margin_direction) / 0.8
    return torch.tensor([a, c, 0.5, 0.5]).reshape(1, 2, 2)


def test_certified_radius_is_close_to_and_rarely_above_the_true_radius(linear_binary):
    """The linear base classifier has a known smoothed probability; over many seeds the certified
    radius must exceed the true one at a rate <= alpha and otherwise be close to it."""
    sigma, alpha, trials = 0.5, 0.1, 300
    x = _point(0.3)
    true_radius = linear_binary.margin(x)  # ||w|| = 1
    smoothed = SmoothedClassifier(linear_binary, num_classes=2, method=FloatRS(sigma))
    radii = []
    for seed in range(trials):
        certificate = smoothed.certify(x, n0=50, n=2000, alpha=alpha, generator=torch.Generator().manual_seed(seed))
        assert certificate.label == 1 and not certificate.abstained
        radii.append(certificate.radius)
    radii = np.array(radii)
    exceed = int(np.sum(radii > true_radius))
    assert exceed <= stats.binom.ppf(0.999, trials, alpha)  # the false-certificate rate is at most alpha
    assert np.median(radii) == pytest.approx(true_radius, rel=0.15)


def test_probability_bound_covers_the_true_probability(linear_binary):
    sigma, alpha = 0.25, 0.05
    x = _point(0.2)
    true_p = stats.norm.cdf(linear_binary.margin(x) / sigma)  # 0.79 for class 1
    smoothed = SmoothedClassifier(linear_binary, 2, FloatRS(sigma), batch_size=500)
    certificates = [
        smoothed.certify(x, n0=100, n=1000, alpha=alpha, generator=torch.Generator().manual_seed(s)) for s in range(200)
    ]
    assert all(certificate.label == 1 for certificate in certificates)
    lowers = np.array([certificate.p_lower for certificate in certificates])
    assert np.sum(lowers > true_p) <= stats.binom.ppf(0.999, 200, alpha)
    assert np.mean(lowers) == pytest.approx(true_p - 1.645 * np.sqrt(true_p * (1 - true_p) / 1000), abs=0.01)


def test_certify_abstains_on_the_decision_boundary(linear_binary):
    smoothed = SmoothedClassifier(linear_binary, 2, FloatRS(0.25))
    x = _point(0.0)
    abstained = [
        smoothed.certify(x, n0=100, n=1000, alpha=0.01, generator=torch.Generator().manual_seed(s)).abstained
        for s in range(50)
    ]
    assert sum(abstained) >= 45


def test_predict_returns_the_smoothed_class_and_rarely_errs_on_a_tie(linear_binary):
    smoothed = SmoothedClassifier(linear_binary, 2, FloatRS(0.25))
    clear = smoothed.predict(_point(0.4), n=500, alpha=0.01, generator=torch.Generator().manual_seed(0))
    assert clear.label == 1 and clear.counts.sum() == 500
    far = smoothed.predict(_point(-0.4), n=500, alpha=0.01, generator=torch.Generator().manual_seed(0))
    assert far.label == 0
    # On the boundary both classes have probability 1/2: any returned label is wrong half the time, and
    # the test must answer at most an alpha fraction of the time.
    alpha, trials = 0.1, 300
    answered = sum(
        not smoothed.predict(_point(0.0), n=200, alpha=alpha, generator=torch.Generator().manual_seed(s)).abstained
        for s in range(trials)
    )
    assert answered <= stats.binom.ppf(0.999, trials, alpha)


def test_counts_cover_every_sample_across_batches(linear_binary):
    smoothed = SmoothedClassifier(linear_binary, 2, FloatRS(0.5), batch_size=7)
    counts = smoothed.sample_counts(_point(0.2), 100, torch.Generator().manual_seed(0))
    assert counts.dtype == np.int64 and counts.sum() == 100 and counts.shape == (2,)


@pytest.mark.parametrize(
    ("x", "message"),
    [
        (torch.full((1, 2, 2), float("nan")), "NaN"),
        (torch.full((1, 2, 2), 1.5), r"\[0, 1\]"),
        (torch.zeros((1, 2, 2), dtype=torch.int32), "uint8 lattice image or a float"),
    ],
)
def test_rejects_bad_inputs(linear_binary, x, message):
    smoothed = SmoothedClassifier(linear_binary, 2, FloatRS(0.25))
    with pytest.raises(ValueError, match=message):
        smoothed.certify(x, n0=10, n=10, alpha=0.01)


@pytest.mark.parametrize(
    ("n0", "n", "alpha", "message"),
    [(0, 10, 0.01, "n0"), (10, 0, 0.01, "n must"), (10, 10, 0.0, "alpha"), (10, 10, 1.5, "alpha")],
)
def test_rejects_bad_sampling_arguments(linear_binary, n0, n, alpha, message):
    smoothed = SmoothedClassifier(linear_binary, 2, FloatRS(0.25))
    with pytest.raises(ValueError, match=message):
        smoothed.certify(_point(0.1), n0=n0, n=n, alpha=alpha)


def test_lattice_and_float_images_give_the_same_certificate(linear_binary):
    image = torch.tensor([[[255, 40], [128, 128]]], dtype=torch.uint8)
    smoothed = SmoothedClassifier(linear_binary, 2, FloatRS(0.25))
    from_lattice = smoothed.certify(image, n0=50, n=500, alpha=0.01, generator=torch.Generator().manual_seed(3))
    from_float = smoothed.certify(image / 255, n0=50, n=500, alpha=0.01, generator=torch.Generator().manual_seed(3))
    assert from_lattice.radius == from_float.radius and np.array_equal(from_lattice.counts, from_float.counts)


def test_noise_bank_is_shared_reproducible_and_keeps_coverage(linear_binary):
    """With a noise bank every input reuses the same noise; the guarantee is per input, so over many
    independent banks the false-certificate rate must still stay below alpha."""
    sigma, alpha, trials = 0.5, 0.1, 200
    x = _point(0.3)
    true_radius = linear_binary.margin(x)
    radii = []
    for seed in range(trials):
        smoothed = SmoothedClassifier(linear_binary, 2, FloatRS(sigma), noise_bank_seed=seed)
        first = smoothed.certify(x, n0=50, n=1000, alpha=alpha, generator=torch.Generator().manual_seed(1))
        again = smoothed.certify(x, n0=50, n=1000, alpha=alpha, generator=torch.Generator().manual_seed(2))
        assert first.radius == again.radius  # the per-call generator is unused
        radii.append(first.radius)
    assert np.sum(np.array(radii) > true_radius) <= stats.binom.ppf(0.999, trials, alpha)
    assert np.median(radii) == pytest.approx(true_radius, rel=0.15)


def test_noise_bank_rows_for_selection_and_estimation_are_disjoint(linear_binary):
    smoothed = SmoothedClassifier(linear_binary, 2, FloatRS(0.5), batch_size=16, noise_bank_seed=0)
    x = _point(0.2)
    bank = smoothed.noise_bank(x, 30 + 100)
    expected = smoothed.sample_counts(x, 100, noise=bank[30:])
    certificate = smoothed.certify(x, n0=30, n=100, alpha=0.01)
    assert np.array_equal(certificate.counts, expected)
    assert smoothed.noise_bank(x, 130) is bank  # drawn once


@pytest.mark.parametrize("device", ["cpu", "auto", torch.device("cpu")])
def test_a_cpu_device_certifies_exactly_as_the_default(linear_binary, monkeypatch, device):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    x = _point(0.2)

    def run(**kwargs):
        smoothed = SmoothedClassifier(linear_binary, 2, FloatRS(0.25), batch_size=64, **kwargs)
        assert smoothed.device == torch.device("cpu")
        certificate = smoothed.certify(x, n0=20, n=300, alpha=0.01, generator=torch.Generator().manual_seed(3))
        prediction = smoothed.predict(x, n=300, alpha=0.01, generator=torch.Generator().manual_seed(4))
        return certificate.radius, certificate.counts.tolist(), prediction.counts.tolist()

    assert run(device=device) == run()


def test_an_absent_device_or_an_int8_method_off_the_cpu_is_one_error_line(linear_binary, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(QRobustError, match="device 'cuda' is not available"):
        SmoothedClassifier(linear_binary, 2, FloatRS(0.25), device="cuda")
    with pytest.raises(QRobustError, match="int smoothing of an int8 model runs on the CPU only"):
        SmoothedClassifier(linear_binary, 2, IntRS(0.25), device=torch.device("meta"))
