"""Certify that a prediction survives weight perturbations, and the largest certified radius per input.

Weng et al., "Towards Certificated Model Robustness Against Weight Perturbations" (AAAI 2020), eq. 6:
an input is certified at eps when a lower bound of f_c - f_j over every perturbed network is > 0 for
all j != c; the certified radius is found by bisection on eps (the bounds grow with eps).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from qrobust.bounds.interval import LayerBall, interval_margins
from qrobust.bounds.linear import SingleLayerBound, following_linear_layers
from qrobust.bounds.network import ReluNetwork, as_unit_images
from qrobust.bounds.perturbation import WeightPerturbation, check_norm

METHODS = ("auto", "linear", "interval")
Bounder = Callable[
    [torch.Tensor, torch.Tensor], torch.Tensor
]  # (eps scale (M,), inputs (M,)) -> margin lower bounds (M, classes)


def resolve_method(network: ReluNetwork, layers: Sequence[int], method: str) -> str:
    """``"linear"`` (Theorem 0.1, one layer, only ReLU/Flatten/Linear after it) or ``"interval"`` (any
    number of layers, max pooling allowed); ``"auto"`` picks linear where it applies."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    for k in layers:
        network.check_layer(k)
    if method == "interval":
        return method
    if len(layers) != 1:
        if method == "linear":
            raise ValueError(f"linear bounds perturb a single layer, got layers {tuple(layers)}: use method='interval'")
        return "interval"
    try:
        following_linear_layers(network, layers[0])
    except ValueError:
        if method == "linear":
            raise
        return "interval"
    return "linear"


def margin_bounds(
    network: ReluNetwork,
    images: torch.Tensor,
    labels: torch.Tensor,
    perturbation: WeightPerturbation,
    *,
    method: str = "auto",
) -> torch.Tensor:
    """Lower bounds (N, classes) of f_label - f_j over every network in ``perturbation``; +inf at the label.

    ``images``: [0, 1] floats or uint8 lattice images (divided by 255), (N, C, H, W); ``labels`` (N,).
    """
    x, labels = _inputs(network, images, labels)
    bound = _bounder(network, x, labels, perturbation, resolve_method(network, perturbation.layers, method))
    return bound(torch.ones(len(x), dtype=network.dtype), torch.arange(len(x)))


def certify(
    network: ReluNetwork,
    images: torch.Tensor,
    labels: torch.Tensor,
    perturbation: WeightPerturbation,
    *,
    method: str = "auto",
    batch_size: int = 256,
) -> torch.Tensor:
    """Which inputs provably keep their label under every weight perturbation in ``perturbation``.

    Guarantee: where the result is True, the network with any weights W_hat of the perturbed layers
    within eps (l_p norm per output unit, biases included if ``perturbation.bias``; all other weights
    as trained) classifies the input as ``labels`` (strict argmax). Bounds are computed in the
    network's dtype (float64 by default), so the guarantee holds up to its rounding. An input that
    is misclassified is never certified.

    Args:
        network: a ``ReluNetwork`` (``ReluNetwork.from_model(model)``).
        images: [0, 1] floats or uint8 lattice images (N, C, H, W).
        labels: (N,) classes to certify (true labels, or the network's predictions).
        perturbation: layers, radii, norm and bias of the weight perturbation.
        method: "linear" (Theorem 0.1, single layer), "interval" (IBP) or "auto" (linear where it applies).
        batch_size: inputs bounded at once.

    Returns a bool tensor (N,).
    """
    _check_batch_size(batch_size)
    x, labels = _inputs(network, images, labels)
    method = resolve_method(network, perturbation.layers, method)

    def certified(part: slice) -> torch.Tensor:
        bound = _bounder(network, x[part], labels[part], perturbation, method)
        return _worst(bound, torch.ones(len(labels[part]), dtype=network.dtype), torch.arange(len(labels[part]))) > 0

    flags = _in_threads(certified, len(x), batch_size)
    return torch.cat(flags) if flags else torch.zeros(0, dtype=torch.bool)


def certified_eps(
    network: ReluNetwork,
    images: torch.Tensor,
    labels: torch.Tensor,
    layers: Sequence[int] = (0,),
    norm: float = math.inf,
    *,
    bias: bool = False,
    method: str = "auto",
    eps_range: tuple[float, float] = (1e-10, 10.0),
    rtol: float = 1e-2,
    batch_size: int = 256,
) -> torch.Tensor:
    """The largest certified weight radius eps of each input (problem 6), by a search on eps.

    Guarantee: at the returned eps, all ``layers`` perturbed by the same eps (``WeightPerturbation(layers,
    eps, norm, bias)``), the bounds of ``method`` prove that the prediction stays ``labels`` for every
    weight change within it. The proof may use boxes found at larger radii during the search (they hold
    for smaller ones too), so it can be a little tighter than one ``certify`` call at that eps. The value
    is 0 where even ``eps_range[0]`` is not certified (e.g. a misclassified input) and ``eps_range[1]``
    where the upper end is; otherwise it is within a factor 1 + ``rtol`` of a radius that is not
    certified (the default 1e-2 is plenty for a table; each halving of rtol costs about one more step).
    Interval bounds bracket the radius first (they are cheap); linear bounds then close in on the root
    of their margin, fitting its drop with eps as a power law (``_radius``, ``_search``).
    Units: the weights' own (layer 0 has Normalize folded in). Returns (N,) in the network's dtype.
    """
    perturbation = WeightPerturbation(tuple(layers), 1.0, norm, bias)
    low, high = eps_range
    if not (0 < low < high < math.inf):
        raise ValueError(f"eps_range must be (low, high) with 0 < low < high < inf, got {eps_range!r}")
    if not (isinstance(rtol, (int, float)) and 0 < rtol < math.inf):
        raise ValueError(f"rtol must be > 0, got {rtol!r}")
    _check_batch_size(batch_size)
    x, labels = _inputs(network, images, labels)
    method = resolve_method(network, perturbation.layers, method)
    results = _in_threads(
        lambda part: _radius(network, x[part], labels[part], perturbation, method, low, high, rtol), len(x), batch_size
    )
    return torch.cat(results) if results else torch.zeros(0, dtype=network.dtype)


def _radius(network, x, labels, perturbation, method: str, low: float, high: float, rtol: float) -> torch.Tensor:
    """Per-input search of the largest certified eps in [low, high] (0 if ``low`` is not certified).

    Interval bounds bracket the radius first (they are cheap); linear bounds then start from there and
    ``_search`` closes in on their root, mostly from below: linear bounds are slow far above the radius,
    where many neurons are unstable, and fast just below a radius found not certified, whose boxes they
    reuse. Far below the radius the linear bounds are the line ``SingleLayerBound.descent``, which the
    search fits instead of bounding ``low``; that is bounded only if nothing above it is certified.
    """
    everyone = torch.arange(len(x))
    with torch.no_grad():  # the exact margins at eps = 0, which every bound reaches as eps -> 0
        logits = network(x)
    gaps = (logits.gather(1, labels.view(-1, 1)) - logits).scatter(1, labels.view(-1, 1), math.inf)  # (N, classes)
    exact = gaps.amin(1)
    interval = _bounder(network, x, labels, perturbation, "interval")
    lo, hi = torch.full((len(x),), low, dtype=network.dtype), torch.full((len(x),), high, dtype=network.dtype)
    margin_lo, margin_hi = _worst(interval, lo, everyone), _worst(interval, hi, everyone)
    at_low, at_high = margin_lo > 0, margin_hi > 0
    inside = torch.nonzero(at_low & ~at_high).flatten()
    found = _search(interval, inside, exact[inside], lo[inside], margin_lo[inside], hi[inside], margin_hi[inside], rtol)
    lo[inside], margin_lo[inside] = found
    if method == "interval":
        return torch.where(at_high, high, torch.where(at_low, lo, 0.0))
    (layer,) = perturbation.layers
    single = SingleLayerBound(network, x, layer, perturbation.norm, perturbation.bias)
    linear = _linear(single, labels, perturbation)
    line = (gaps - lo.view(-1, 1) * perturbation.eps_of(layer) * single.descent(labels)).amin(
        1
    )  # linear bounds at lo, to first order
    margin_lo = torch.where(
        at_low, torch.maximum(margin_lo, line), line
    )  # for the fit only: lo is certified by interval bounds or checked below
    rest = torch.nonzero(~at_high & (margin_lo > 0)).flatten()
    unknown = torch.full((len(rest),), math.nan, dtype=network.dtype)  # high is not tried yet
    result = torch.where(at_high, hi, 0.0)  # (a tensor: two Python floats would make float32)
    result[rest] = _search(linear, rest, exact[rest], lo[rest], margin_lo[rest], hi[rest], unknown, rtol)[0]
    unchecked = torch.nonzero(~at_low & (exact > 0) & (result <= low)).flatten()  # is low certified at all?
    if len(unchecked):
        result[unchecked] = torch.where(_worst(linear, lo[unchecked], unchecked) > 0, lo[unchecked], 0.0)
    return result


def _search(
    bound: Bounder,
    index: torch.Tensor,
    exact: torch.Tensor,
    lo: torch.Tensor,
    margin_lo: torch.Tensor,
    hi: torch.Tensor,
    margin_hi: torch.Tensor,
    rtol: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The largest certified eps of the inputs ``index`` within a factor 1 + ``rtol``, in [lo, hi], and its margin.

    ``lo`` is certified with margin lower bound ``margin_lo`` > 0; ``hi`` is not (``margin_hi`` <= 0), or
    is the end of the range, not tried yet (``margin_hi`` NaN: it is returned if certified). ``exact``
    is the margin at eps = 0. The drop of the margin, exact - margin(eps), grows with eps about as a
    power of it; each step tries the root of the power law through lo and hi, or before any failure
    through the last two certified radii (from eps = 0 at first a straight line, whose root is often 2-3
    times too far, so ``FIRST_STEP`` of it is tried: bounds far above the radius are slow). The step
    is kept inside the bracket, snapped to lo (1 + rtol) or hi / (1 + rtol) when within a factor
    (1 + rtol) of it (so that the next result can end the search; in a bracket narrower than
    (1 + rtol)^2 its geometric middle ends it either way), and a bisection in log eps follows a step
    that did not shrink the log bracket by a third, unless the root looks that close to lo. Margins fall
    with eps, so the bracket stays valid.
    """
    lo, margin_lo, hi, margin_hi = lo.clone(), margin_lo.clone(), hi.clone(), margin_hi.clone()
    prev, margin_prev = torch.zeros_like(lo), exact.clone()
    high = hi.clone()
    slow = torch.zeros(len(lo), dtype=torch.bool)
    while True:
        bracketed = ~torch.isnan(margin_hi)
        todo = torch.nonzero(torch.where(bracketed, hi > lo * (1 + rtol), lo < high)).flatten()
        if len(todo) == 0:
            return lo, margin_lo
        below, above, closed = lo[todo], hi[todo], bracketed[todo]
        drop = exact[todo] - margin_lo[todo]  # (T,)
        # the power law through (lo, hi) once bracketed, else through the last two certified radii (or eps = 0)
        other = torch.where(closed, above, prev[todo])
        other_drop = exact[todo] - torch.where(closed, margin_hi[todo], margin_prev[todo])
        power = ((other_drop / drop).log() / (other / below).log()).clamp(1, MAX_POWER)
        power = torch.where(torch.isfinite(power) & (other > 0), power, 1.0)
        estimate = below * (exact[todo] / drop) ** (1 / power)  # where exact - drop(lo) (eps / lo) ** power = 0
        estimate = torch.where(other > 0, estimate, estimate * FIRST_STEP)
        estimate = torch.nan_to_num(estimate, nan=math.inf, posinf=math.inf).clamp(
            below * MIN_GROWTH, below * MAX_GROWTH
        )
        share = ((estimate.log() - below.log()) / (above.log() - below.log())).clamp(
            0.02, 0.98
        )  # position in the log bracket
        share = torch.where(
            slow[todo] & (estimate > below * (1 + rtol) ** 2), 0.5, share
        )  # unless the root looks within reach
        step = torch.where(closed, below * (above / below) ** share, torch.minimum(estimate, above))
        step = torch.where(
            closed & (step < below * (1 + rtol) ** 2), below * (1 + rtol), step
        )  # a failure there ends the search
        last = above / (1 + rtol) * (1 + 1e-12)  # a success there ends it (the factor outweighs rounding)
        step = torch.where(closed & (step > last / (1 + rtol)), last, step)
        step = torch.where(
            closed & (above <= below * (1 + rtol) ** 2), (below * above).sqrt(), step
        )  # either result ends it there
        margin = _worst(bound, step, index[todo])
        ok = margin > 0
        kept = torch.where(ok, above.log() - step.log(), step.log() - below.log()) / (above.log() - below.log())
        slow[todo] = closed & (kept > 2 / 3)
        prev[todo], margin_prev[todo] = (
            torch.where(ok, below, prev[todo]),
            torch.where(ok, margin_lo[todo], margin_prev[todo]),
        )
        lo[todo], margin_lo[todo] = torch.where(ok, step, below), torch.where(ok, margin, margin_lo[todo])
        hi[todo], margin_hi[todo] = torch.where(ok, above, step), torch.where(ok, margin_hi[todo], margin)


MIN_GROWTH, MAX_GROWTH = 1.01, 1e6  # bounds on the factor between successive radii tried from below
MAX_POWER = 16.0  # the largest power of eps fitted to the margin's drop
FIRST_STEP = 0.3  # the straight line from eps = 0 overshoots the root: often 2-3 times


def _in_threads(function: Callable[[slice], torch.Tensor], count: int, batch_size: int) -> list[torch.Tensor]:
    """``function`` on consecutive slices of ``count`` inputs (at most ``batch_size`` each, and at least as
    many slices as torch has threads when there are ``MIN_SLICE`` inputs per slice), in that many Python
    threads whose tensor ops run single-threaded. The inputs' bounds are independent, and they are
    computed by many small tensor ops that torch's own threads barely speed up: on 2 cores, two threads
    of single-threaded ops certify 1.3x faster (bench/weight_bound_speed.py). Results are in order."""
    if count == 0:
        return []
    threads = torch.get_num_threads()
    pieces = max(-(-count // batch_size), min(threads, count // MIN_SLICE), 1)
    edges = [round(i * count / pieces) for i in range(pieces + 1)]
    slices = [slice(start, end) for start, end in itertools.pairwise(edges)]
    if threads == 1 or pieces == 1:
        return [function(part) for part in slices]
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(min(threads, pieces)) as pool:
            return list(pool.map(function, slices))
    finally:
        torch.set_num_threads(threads)


MIN_SLICE = 8  # inputs per thread, below which splitting the work costs more than it saves


def _worst(bound: Bounder, eps: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The smallest margin lower bound (M,) of the inputs ``index`` at radius scale ``eps`` (M,)."""
    return bound(eps, index).amin(1)


def _bounder(
    network: ReluNetwork, x: torch.Tensor, labels: torch.Tensor, perturbation: WeightPerturbation, method: str
) -> Bounder:
    """Margin lower bounds of the inputs ``index`` as a function of a per-input scale of ``perturbation``'s
    radii. Linear bounds are never looser than interval ones: their boxes lie inside the interval boxes,
    and the first bound their margins meet is the interval one on those boxes (tested)."""

    def interval(scale: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        balls = {
            k: LayerBall(scale * perturbation.eps_of(k), perturbation.norm, perturbation.bias)
            for k in perturbation.layers
        }
        with torch.no_grad():
            return interval_margins(network, x[index], labels[index], balls)

    if method == "interval":
        return interval
    (layer,) = perturbation.layers
    return _linear(SingleLayerBound(network, x, layer, perturbation.norm, perturbation.bias), labels, perturbation)


def _linear(single: SingleLayerBound, labels: torch.Tensor, perturbation: WeightPerturbation) -> Bounder:
    """``single``'s margin lower bounds as a ``Bounder`` of ``perturbation``'s only layer."""
    (layer,) = perturbation.layers

    def linear(scale: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return single.margins(scale * perturbation.eps_of(layer), labels[index], index)

    return linear


@dataclass(frozen=True)
class LayerCertificate:
    """Certified weight radii of one layer over a set of inputs: ``eps`` (N,), 0 where not certified."""

    layer: int
    description: str
    method: str
    eps: torch.Tensor

    @property
    def mean(self) -> float:
        return float(self.eps.mean())

    @property
    def median(self) -> float:
        return float(self.eps.median())

    @property
    def certified_fraction(self) -> float:
        """Inputs certified at the smallest radius tried (correctly classified, with a positive margin)."""
        return float((self.eps > 0).to(torch.float64).mean())


def certified_eps_table(
    network: ReluNetwork,
    images: torch.Tensor,
    labels: torch.Tensor,
    layers: Sequence[int] | None = None,
    norm: float = math.inf,
    *,
    bias: bool = False,
    on_layer: Callable[[LayerCertificate], None] | None = None,
    **options,
) -> list[LayerCertificate]:
    """``certified_eps`` of each layer alone (default: every layer), as the paper's Table 1.

    ``on_layer`` is called after each layer (progress); ``options`` go to ``certified_eps``.
    """
    check_norm(norm)
    chosen = range(network.num_layers) if layers is None else layers
    table = []
    for k in chosen:
        network.check_layer(k)
        method = resolve_method(network, (k,), options.get("method", "auto"))
        eps = certified_eps(network, images, labels, (k,), norm, bias=bias, **(options | {"method": method}))
        table.append(LayerCertificate(k, network.layers[k].describe(), method, eps))
        if on_layer is not None:
            on_layer(table[-1])
    return table


def _inputs(network: ReluNetwork, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = as_unit_images(images, network.dtype)
    if not isinstance(labels, torch.Tensor) or labels.shape != (len(x),) or labels.is_floating_point():
        raise ValueError(
            f"labels must be an integer tensor of shape ({len(x)},), got {getattr(labels, 'shape', labels)!r}"
        )
    classes = network.layers[-1].weight.shape[0]
    if len(labels) and not (0 <= int(labels.min()) and int(labels.max()) < classes):
        raise ValueError(f"labels must be in [0, {classes - 1}]")
    return x, labels.long()


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
