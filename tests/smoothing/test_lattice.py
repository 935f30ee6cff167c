"""Soundness of the IntRS certificates on the integer lattice, checked against exact enumeration.

Every probability here is exact up to a truncated noise mass that is bounded and counted against the
claim being tested (``SmoothedGrid.dropped``). Counter-examples to the paper's radius are named as such.
"""

import itertools
import math

import mpmath
import numpy as np
import pytest
from scipy.stats import norm

from qrobust.smoothing import clopper_pearson_lower
from qrobust.smoothing.lattice import (
    LatticeRadiusTable,
    critical_probability,
    discrete_gaussian,
    paper_radius,
    projection_pmf,
    smoothed_grid,
    sound_squared_radius,
    worst_case_probability,
)

GRID_TAIL = 1e-15  # per-coordinate noise mass the exact grids may drop


def square_partitions(total: int, largest: int | None = None):
    """Every multiset of positive integers (non-increasing tuple) whose squares sum to ``total``."""
    largest = math.isqrt(total) if largest is None else largest
    if total == 0:
        yield ()
        return
    for part in range(min(largest, math.isqrt(total)), 0, -1):
        for rest in square_partitions(total - part * part, part):
            yield (part, *rest)


def lattice_cdf(m: int, sigma: float) -> float:
    noise = discrete_gaussian(sigma)
    return float(noise.mass[: m - noise.offset + 1].sum())


def half_space(weight, bias):
    """Class 0 iff <weight, z> <= bias."""
    weight = np.asarray(weight)
    return lambda z: np.where(z @ weight <= bias, 0, 1)


def ball(center, squared_radius):
    """Class 0 inside the closed ball, 1 outside (a non-linear decision region)."""
    center = np.asarray(center)
    return lambda z: np.where(((z - center) ** 2).sum(axis=1) <= squared_radius, 0, 1)


def xor(center):
    """Class 0 where (z_1 - c_1) and (z_2 - c_2) have the same sign (half-integer centre, no ties)."""
    center = np.asarray(center, dtype=float)
    return lambda z: np.where((z[:, 0] - center[0]) * (z[:, 1] - center[1]) > 0, 0, 1)


def linear_argmax(weights, biases):
    """Three classes: argmax_c <weights[c], z> + biases[c]."""
    weights, biases = np.asarray(weights, dtype=float), np.asarray(biases, dtype=float)
    return lambda z: np.argmax(z @ weights.T + biases, axis=1)


def lex_half_space(delta, key):
    """Class 0 iff (<z, delta>, z_1, ..., z_d) <= key lexicographically: the Neyman-Pearson worst case for
    ``delta`` (a half-space plus part of its boundary hyperplane), made deterministic."""
    delta = np.asarray(delta)

    def classify(z):
        columns = [z @ delta] + [z[:, i] for i in range(z.shape[1])]
        less, equal = np.zeros(len(z), dtype=bool), np.ones(len(z), dtype=bool)
        for column, bound in zip(columns, key, strict=True):
            less |= equal & (column < bound)
            equal &= column == bound
        return np.where(less | equal, 0, 1)

    return classify


# --- exact tools ------------------------------------------------------------------------------------


@pytest.mark.parametrize("sigma", [0.5, 2.0, 63.75])
def test_discrete_gaussian_matches_mpmath_and_bounds_its_tail(sigma):
    mpmath.mp.dps = 40
    reach = int(40 * sigma) + 40
    weights = [mpmath.exp(-(mpmath.mpf(k) ** 2) / (2 * mpmath.mpf(sigma) ** 2)) for k in range(reach + 1)]
    normaliser = weights[0] + 2 * mpmath.fsum(weights[1:])
    noise = discrete_gaussian(sigma, tail=1e-12)
    cut = -noise.offset
    for k in (0, 1, cut // 2, cut):
        assert noise.mass[k + cut] == pytest.approx(float(weights[k] / normaliser), rel=1e-12)
    true_tail = float(2 * mpmath.fsum(weights[cut + 1 :]) / normaliser)
    assert true_tail <= noise.dropped <= 1e-12
    assert 1.0 - noise.mass.sum() == pytest.approx(true_tail, abs=1e-15)


@pytest.mark.parametrize("delta", [(2, -1), (1, 1, 1), (3, 0, 1)])
def test_projection_pmf_is_the_law_of_the_inner_product(delta):
    sigma = 1.0
    noise = discrete_gaussian(sigma, tail=1e-20)
    values = np.arange(noise.offset, noise.offset + len(noise.mass))
    law = projection_pmf(delta, sigma, tail=1e-20)
    expected = {}
    for point in itertools.product(range(len(values)), repeat=len(delta)):
        s = int(np.dot(values[list(point)], delta))
        expected[s] = expected.get(s, 0.0) + float(np.prod(noise.mass[list(point)]))
    for s, probability in expected.items():
        assert law.mass[s - law.offset] == pytest.approx(probability, rel=1e-12, abs=1e-300)
    assert law.dropped <= 3e-20


@pytest.mark.parametrize("sigma", [0.5, 2.0, 10.0])
@pytest.mark.parametrize("delta", [(1,), (3,), (1, 1), (2, 1), (2, 2, 1), (1, 1, 1, 1)])
def test_critical_probability_is_where_the_worst_case_crosses_one_half(sigma, delta):
    threshold = critical_probability(delta, sigma)
    law = projection_pmf(delta, sigma)
    squared = int(np.dot(delta, delta))
    direct = law.mass[: squared - law.offset].sum() + 0.5 * law.mass[squared - law.offset]  # P[S<D] + P[S=D]/2
    assert direct - 1e-15 <= threshold <= direct + 2e-9 * (1.0 - direct) + 1e-15  # rounded up by the margin
    slope = math.exp(squared / (2 * sigma**2))  # dW/dpA at pA = T: the likelihood ratio on the plane S = D
    assert worst_case_probability(direct, delta, sigma) == pytest.approx(0.5, abs=1e-13 * slope + 1e-12)
    assert worst_case_probability(threshold, delta, sigma) >= 0.5 - 1e-13 * slope - 1e-12
    assert worst_case_probability(min(1.0, threshold + 1e-6), delta, sigma) > 0.5
    assert worst_case_probability(threshold - 1e-6, delta, sigma) < 0.5


@pytest.mark.parametrize("sigma", [0.3, 0.5, 1.0, 2.0, 10.0, 63.75])
def test_cohen_radius_bounds_every_direction(sigma):
    """Proven in docs/intrs-radius.md: T(delta) <= Phi(||delta|| / sigma) for all integer delta."""
    for squared in range(1, 19):
        for delta in square_partitions(squared):  # a coarser truncation only raises T: still a valid check
            assert critical_probability(delta, sigma, tail=1e-30) <= norm.cdf(math.sqrt(squared) / sigma) + 1e-15


def test_smoothed_grid_matches_the_one_dimensional_cdf():
    sigma = 2.0
    grid = smoothed_grid(half_space([1], 0), [-3], [3], sigma, num_classes=2, tail=GRID_TAIL)
    for x in range(-3, 4):
        probabilities = grid.at([x])
        assert probabilities[0] == pytest.approx(lattice_cdf(-x, sigma), abs=2e-15)
        assert 1.0 - grid.dropped <= probabilities.sum() <= 1.0 + 1e-12
    with pytest.raises(ValueError, match="box"):
        grid.at([4])


# --- the sound radius -----------------------------------------------------------------------------


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.0])
def test_sound_radius_equals_brute_force_over_all_directions(sigma):
    """The largest K with T(delta) < pA for every delta with ||delta||^2 <= K, all dimensions, found by
    enumerating every multiset of |delta_i| with the convolution-based critical_probability."""
    for p_a in (0.6, 0.75, 0.9, 0.95, 0.97, 0.99, 0.999, 0.9999):
        expected, squared = 0, 1
        while max(critical_probability(delta, sigma, tail=1e-30) for delta in square_partitions(squared)) < p_a:
            expected, squared = squared, squared + 1
        assert sound_squared_radius(p_a, sigma) == expected, p_a


def test_sound_radius_abstains_at_one_half_and_is_monotone():
    assert sound_squared_radius(0.5, 2.0) is None
    assert sound_squared_radius(0.3, 2.0) is None
    radii = [sound_squared_radius(p, 2.0) for p in np.linspace(0.501, 0.99999, 60)]
    assert radii == sorted(radii)
    assert sound_squared_radius(0.96, 0.5) == 1  # exact: T(e_1) = 0.947 < 0.96
    assert sound_squared_radius(0.96, 0.5, exact_up_to=0) == 0  # Cohen: 0.5 * Phi^-1(0.96) = 0.875 < 1


SOUNDNESS_CASES = [
    # (sigma, classifier, num_classes, x, class)
    (0.5, half_space([1], 1), 2, (0,), 0),
    (2.0, half_space([1], 5), 2, (0,), 0),
    (10.0, half_space([1], 12), 2, (0,), 0),
    (0.5, ball((0, 0), 2), 2, (0, 0), 0),
    (2.0, half_space([3, -2], 7), 2, (0, 0), 0),
    (2.0, xor((0.5, 0.5)), 2, (4, 4), 0),
    (10.0, ball((0, 0), 900), 2, (0, 0), 0),
    (10.0, half_space([1, 1], 20), 2, (0, 0), 0),
    (0.5, ball((0, 0, 0), 3), 2, (0, 0, 0), 0),
    (2.0, linear_argmax([[1, 1, 0], [-1, 0, 1], [0, -1, -1]], [4, 0, 0]), 3, (0, 0, 0), 0),
    (2.0, ball((1, 0, 0), 40), 2, (0, 0, 0), 0),
    (2.0, lex_half_space((2, 2, 1), (9, 1, 4, -1)), 2, (0, 0, 0), 0),  # worst case for (2, 2, 1)
]


SOUNDNESS_IDS = [
    "d1-0.5-half-space",
    "d1-2-half-space",
    "d1-10-half-space",
    "d2-0.5-ball",
    "d2-2-half-space",
    "d2-2-xor",
    "d2-10-ball",
    "d2-10-half-space",
    "d3-0.5-ball",
    "d3-2-three-classes",
    "d3-2-ball",
    "d3-2-worst-case-diagonal",
]


@pytest.mark.parametrize(("sigma", "classify", "num_classes", "x", "label"), SOUNDNESS_CASES, ids=SOUNDNESS_IDS)
def test_no_lattice_point_in_the_certified_ball_changes_the_prediction(sigma, classify, num_classes, x, label):
    d = len(x)
    reach = math.ceil(4 * sigma) + 3 if d < 3 else math.ceil(3 * sigma) + 3
    grid = smoothed_grid(
        classify, [c - reach for c in x], [c + reach for c in x], sigma, num_classes=num_classes, tail=GRID_TAIL
    )
    p_a = float(grid.at(x)[label])  # a lower bound on the true probability, as certification needs
    squared = sound_squared_radius(p_a, sigma)
    assert squared is not None and math.isqrt(squared) < reach  # the ball fits in the grid
    table = LatticeRadiusTable(sigma, n=10_000, alpha=0.001)
    count = int(np.searchsorted(table.p_lower, p_a, side="right")) - 1  # largest count with pA_lower <= p_a
    table_squared = table.squared_radius(count)
    assert table_squared is not None and table_squared <= squared
    for offset in itertools.product(range(-reach, reach + 1), repeat=d):
        norm2 = sum(o * o for o in offset)
        point = [c + o for c, o in zip(x, offset, strict=True)]
        probability = float(grid.at(point)[label])
        if norm2 <= squared:
            assert probability > 0.5, (offset, probability)
        if norm2 <= (math.isqrt(squared) + 2) ** 2:  # the Neyman-Pearson bound holds beyond the ball too
            bound = worst_case_probability(p_a, offset, sigma, tail=GRID_TAIL)
            assert probability + grid.dropped >= bound - 1e-12, (offset, probability, bound)


def test_the_worst_case_is_attained_by_a_deterministic_classifier():
    sigma, delta, key = 2.0, (2, 2, 1), (9, 1, 4, -1)
    grid = smoothed_grid(lex_half_space(delta, key), [0, 0, 0], list(delta), sigma, num_classes=2, tail=GRID_TAIL)
    p_a = float(grid.at([0, 0, 0])[0])
    bound = worst_case_probability(p_a, delta, sigma, tail=GRID_TAIL)
    assert float(grid.at(delta)[0]) == pytest.approx(bound, abs=1e-12)


# --- the lookup table -----------------------------------------------------------------------------


def test_table_matches_clopper_pearson_and_the_scalar_radius():
    n, alpha, sigma = 2_000, 0.01, 2.0
    table = LatticeRadiusTable(sigma, n, alpha)
    for count in range(n + 1):
        assert table.p_lower[count] == clopper_pearson_lower(count, n, alpha)
    for count in range(0, n + 1, 37):
        p_lower = clopper_pearson_lower(count, n, alpha)
        assert table.squared_radius(count) == (sound_squared_radius(p_lower, sigma) if p_lower > 0.5 else None)
    first = table.min_count
    assert table.squared_radius(first - 1) is None and table.radius(first - 1) is None
    assert table.p_lower[first] > 0.5 >= table.p_lower[first - 1]
    squared = [table.squared_radius(count) for count in range(first, n + 1)]
    assert squared == sorted(squared) and squared[-1] > 0
    assert table.radius(n) == math.sqrt(squared[-1]) / 255.0


def test_table_for_cifar_noise_agrees_with_cohen_radius():
    """sigma = 0.25 in [0, 1] units is sigma_int = 63.75; the sound radius is Cohen's to within one
    lattice step (1/255), never below it."""
    n, alpha, sigma = 100_000, 0.001, 63.75
    table = LatticeRadiusTable(sigma, n, alpha)
    counts = np.arange(table.min_count, n + 1, 97)
    cohen = sigma * norm.ppf(table.p_lower[counts])
    squared = np.array([table.squared_radius(int(c)) for c in counts])
    assert np.all(squared >= np.ceil(cohen**2) - 1)
    assert np.all(np.abs(np.sqrt(squared) - cohen) <= 1.0)
    radius = np.array([table.radius(int(c)) for c in counts])
    assert np.all(np.abs(radius - 0.25 * norm.ppf(table.p_lower[counts])) <= 1.0 / 255.0)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: LatticeRadiusTable(0.0, 100, 0.01), "sigma"),
        (lambda: LatticeRadiusTable(2.0, 0, 0.01), "n must"),
        (lambda: LatticeRadiusTable(2.0, 100, 1.5), "alpha"),
        (lambda: LatticeRadiusTable(2.0, 100, 0.01, scale=-1.0), "scale"),
        (lambda: LatticeRadiusTable(2.0, 100, 0.01).squared_radius(101), "count"),
        (lambda: sound_squared_radius(1.0, 2.0), "p_a"),
        (lambda: sound_squared_radius(0.9, 2.0, exact_up_to=-1), "exact_up_to"),
        (lambda: paper_radius(0.4, 2.0), "p_a"),
        (lambda: critical_probability((0.5, 1), 2.0), "delta"),
        (lambda: discrete_gaussian(2.0, tail=0.0), "tail"),
        (lambda: worst_case_probability(1.2, (1,), 2.0), "p_a"),
    ],
)
def test_invalid_arguments_are_rejected(make, message):
    with pytest.raises(ValueError, match=message):
        make()


# --- counter-examples to the paper's radius sigma * Phi_NH^-1(pA) ----------------------------------


@pytest.mark.parametrize(("sigma", "step", "far"), [(2.0, 1, 4), (63.75, 64, 200)])
def test_counterexample_paper_radius_unsound_along_an_axis(sigma, step, far):
    """f = class 0 on {z <= step - 1} and on the far point {far}: P[f(x + n) = 0] is just above
    P[n <= step - 1], so the paper certifies radius ``step`` (Theorem 3.1: ||delta||^2 <= R^2), yet
    moving x by ``step`` along the axis flips the smoothed prediction."""

    def classify(z):
        return np.where((z[:, 0] <= step - 1) | (z[:, 0] == far), 0, 1)

    grid = smoothed_grid(classify, [0], [step], sigma, num_classes=2, tail=GRID_TAIL)
    p_a = float(grid.at([0])[0])
    assert paper_radius(p_a, sigma) == step
    assert float(grid.at([step])[0]) + grid.dropped < 0.5  # g(x + step) = 1
    assert sound_squared_radius(p_a, sigma) < step * step


def test_counterexample_paper_radius_unsound_along_an_axis_in_exact_arithmetic():
    """The sigma = 2 axis counter-example with 40-digit sums over the whole lattice (no truncation
    beyond exp(-1200))."""
    mpmath.mp.dps = 40

    def weight(k):  # sigma = 2
        return mpmath.exp(-(mpmath.mpf(k) ** 2) / 8)

    normaliser = mpmath.fsum(weight(k) for k in range(-200, 201))

    def cdf(m):
        return mpmath.fsum(weight(k) for k in range(-200, m + 1)) / normaliser

    p_x = cdf(0) + weight(4) / normaliser  # P[f(x + n) = 0]
    p_shifted = cdf(-1) + weight(3) / normaliser  # P[f(x + 1 + n) = 0]
    assert cdf(0) < p_x <= cdf(1)  # so the paper's lookup returns Phi_NH^-1 = 1 / sigma: radius 1
    assert p_shifted < mpmath.mpf("0.4651")


@pytest.mark.parametrize(("sigma", "key"), [(2.0, (8, 0, 4)), (63.75, (8, -79, 83))])
def test_counterexample_paper_radius_unsound_off_axis_even_with_strict_inequality(sigma, key):
    """delta = (2, 2) has ||delta||^2 = 8 < 9 = R_paper^2, so even the strict form of eq. (8) claims it;
    the Neyman-Pearson worst case for that direction (a lexicographic half-space) flips the prediction."""
    delta = (2, 2)
    grid = smoothed_grid(lex_half_space(delta, key), [0, 0], list(delta), sigma, num_classes=2, tail=GRID_TAIL)
    p_a = float(grid.at([0, 0])[0])
    assert paper_radius(p_a, sigma) == 3
    assert float(grid.at(delta)[0]) + grid.dropped < 0.5
    assert sound_squared_radius(p_a, sigma) < 8


def test_counterexample_radius_from_the_one_dimensional_law_unsound_on_a_diagonal():
    """At sigma = 2 the axis perturbation 3 e_1 is certified exactly (T(3 e_1) < pA), so any radius derived
    from the 1-D law certifies norm 3; the diagonal (2, 2, 1) of the same norm is not: S = <n, delta> is
    not a scaled 1-D discrete Gaussian."""
    sigma, delta = 2.0, (2, 2, 1)
    grid = smoothed_grid(lex_half_space(delta, (9, 1, 4, -1)), [0, 0, 0], list(delta), sigma, 2, tail=GRID_TAIL)
    p_a = float(grid.at([0, 0, 0])[0])
    assert critical_probability((3,), sigma) < p_a <= critical_probability(delta, sigma)
    assert float(grid.at(delta)[0]) + grid.dropped < 0.5
    assert sound_squared_radius(p_a, sigma) == 8
