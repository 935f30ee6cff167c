"""Certify that a prediction survives weight perturbations, and the largest certified radius per input.

Weng et al., "Towards Certificated Model Robustness Against Weight Perturbations" (AAAI 2020), eq. 6:
an input is certified at eps when a lower bound of f_c - f_j over every perturbed network is > 0 for
all j != c; the certified radius is found by bisection on eps (the bounds grow with eps).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from qrobust.bounds.interval import LayerBall, interval_margins
from qrobust.bounds.linear import SingleLayerBound, _following_linear_layers
from qrobust.bounds.network import ReluNetwork, as_unit_images
from qrobust.bounds.perturbation import WeightPerturbation, check_norm

METHODS = ("auto", "linear", "interval")
Bounder = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (eps scale (M,), inputs (M,)) -> margin lower bounds (M, classes)


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
        _following_linear_layers(network, layers[0])
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
    flags = []
    for start in range(0, len(x), batch_size):
        chunk, chunk_labels = x[start : start + batch_size], labels[start : start + batch_size]
        bound = _bounder(network, chunk, chunk_labels, perturbation, method)
        flags.append(_worst(bound, torch.ones(len(chunk), dtype=network.dtype), torch.arange(len(chunk))) > 0)
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
    Interval bounds bracket the radius first (they are cheap); linear bounds then extrapolate their
    margin from below and close in on its root with secant steps (``_radius``, ``_search``).
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
    results = []
    for start in range(0, len(x), batch_size):
        chunk, chunk_labels = x[start : start + batch_size], labels[start : start + batch_size]
        results.append(_radius(network, chunk, chunk_labels, perturbation, method, low, high, rtol))
    return torch.cat(results) if results else torch.zeros(0, dtype=network.dtype)


def _radius(network, x, labels, perturbation, method: str, low: float, high: float, rtol: float) -> torch.Tensor:
    """Per-input search of the largest certified eps in [low, high] (0 if ``low`` is not certified).

    Interval bounds bracket the radius first (they are cheap); linear bounds then start from there and
    extrapolate their margin to its root until a radius is not certified (linear bounds are slow above
    the radius, where many neurons are unstable, and fast below it), and ``_search`` closes the bracket.
    """
    everyone = torch.arange(len(x))
    interval = _bounder(network, x, labels, perturbation, "interval")
    lo, hi = torch.full((len(x),), low, dtype=network.dtype), torch.full((len(x),), high, dtype=network.dtype)
    margin_lo, margin_hi = _worst(interval, lo, everyone), _worst(interval, hi, everyone)
    at_low, at_high = margin_lo > 0, margin_hi > 0
    inside = torch.nonzero(at_low & ~at_high).flatten()
    lo[inside] = _search(interval, inside, lo[inside], margin_lo[inside], hi[inside], margin_hi[inside], rtol)
    result = torch.where(at_high, high, torch.where(at_low, lo, 0.0)).to(network.dtype)
    if method == "interval":
        return result
    linear = _bounder(network, x, labels, perturbation, "linear")
    with torch.no_grad():  # the exact margin at eps = 0: the first point of the extrapolation below
        logits = network(x)
    margin_prev = (logits.gather(1, labels.view(-1, 1)) - logits).scatter(1, labels.view(-1, 1), math.inf).amin(1)
    prev, margin_lo = torch.zeros_like(result), torch.zeros_like(result)
    lo, hi, margin_hi = torch.where(at_low, result, low), result.clone(), torch.zeros_like(result)
    rest = torch.nonzero(~at_high).flatten()
    margin_lo[rest] = _worst(linear, lo[rest], rest)  # where interval bounds certify lo, linear ones do (both are kept)
    lo[rest[margin_lo[rest] <= 0]] = 0.0
    rest = rest[margin_lo[rest] > 0]
    while len(rest):  # extrapolate the margin linearly from the last two certified radii, until one is not certified
        slope = (margin_prev[rest] - margin_lo[rest]) / (lo[rest] - prev[rest])
        step = torch.nan_to_num(lo[rest] + margin_lo[rest] / slope, nan=math.inf, posinf=math.inf, neginf=math.inf)
        step = torch.minimum(step.clamp(lo[rest] * MIN_GROWTH, lo[rest] * MAX_GROWTH), torch.tensor(high, dtype=lo.dtype))
        margin = _worst(linear, step, rest)
        ok = margin > 0
        certified = rest[ok]
        prev[certified], margin_prev[certified] = lo[certified], margin_lo[certified]
        lo[certified], margin_lo[certified] = step[ok], margin[ok]
        hi[rest], margin_hi[rest] = step, margin
        rest = rest[ok & (step < high)]
    grown = torch.nonzero(hi > lo).flatten()
    lo[grown] = _search(linear, grown, lo[grown], margin_lo[grown], hi[grown], margin_hi[grown], rtol)
    return lo


MIN_GROWTH, MAX_GROWTH = 1.25, 1e6  # bounds on the factor between successive radii tried from below


def _worst(bound: Bounder, eps: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The smallest margin lower bound (M,) of the inputs ``index`` at radius scale ``eps`` (M,)."""
    return bound(eps, index).amin(1)


def _search(
    bound: Bounder,
    index: torch.Tensor,
    lo: torch.Tensor,
    margin_lo: torch.Tensor,
    hi: torch.Tensor,
    margin_hi: torch.Tensor,
    rtol: float,
) -> torch.Tensor:
    """The largest certified eps of the inputs ``index``, within a factor 1 + ``rtol``, in the bracket [lo, hi].

    ``lo`` is certified with margin lower bound ``margin_lo`` > 0, ``hi`` is not (``margin_hi`` <= 0).
    Each step tries the root of the secant through (lo, margin_lo) and (hi, margin_hi), nudged by rtol / 4 towards
    the far end of the bracket so that the next step can close it, in log eps; a step that does not
    halve the log bracket is followed by a bisection step, so it never takes more than twice as many
    steps as bisection. Margins fall with eps, so the bracket stays valid.
    """
    lo, margin_lo, hi, margin_hi = lo.clone(), margin_lo.clone(), hi.clone(), margin_hi.clone()
    slow = torch.zeros(len(lo), dtype=torch.bool)
    nudge = 1 + rtol / 4
    while True:
        todo = torch.nonzero(hi > lo * (1 + rtol)).flatten()
        if len(todo) == 0:
            return lo
        l, m_l, h, m_h = lo[todo], margin_lo[todo], hi[todo], margin_hi[todo]
        root = l + (h - l) * m_l / (m_l - m_h)  # (T,)
        root = torch.where(root.log() - l.log() < h.log() - root.log(), root * nudge, root / nudge)
        share = ((root.log() - l.log()) / (h.log() - l.log())).clamp(0.01, 0.99)  # position in the log bracket
        share = torch.where(torch.isfinite(share) & ~slow[todo], share, 0.5)
        mid = l * (h / l) ** share
        margin = _worst(bound, mid, index[todo])
        ok = margin > 0
        slow[todo] = torch.where(ok, 1 - share, share) > 0.5  # the bracket kept more than half its log length
        lo[todo], margin_lo[todo] = torch.where(ok, mid, l), torch.where(ok, margin, m_l)
        hi[todo], margin_hi[todo] = torch.where(ok, h, mid), torch.where(ok, m_h, margin)


def _bounder(network: ReluNetwork, x: torch.Tensor, labels: torch.Tensor, perturbation: WeightPerturbation, method: str) -> Bounder:
    """Margin lower bounds of the inputs ``index`` as a function of a per-input scale of ``perturbation``'s
    radii; linear bounds also take the interval ones into account (both are sound, the larger is kept)."""

    def interval(scale: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        balls = {k: LayerBall(scale * perturbation.eps_of(k), perturbation.norm, perturbation.bias) for k in perturbation.layers}
        with torch.no_grad():
            return interval_margins(network, x[index], labels[index], balls)

    if method == "interval":
        return interval
    (layer,) = perturbation.layers
    single = SingleLayerBound(network, x, layer, perturbation.norm, perturbation.bias)

    def linear(scale: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return torch.maximum(single.margins(scale * perturbation.eps_of(layer), labels[index], index), interval(scale, index))

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
        raise ValueError(f"labels must be an integer tensor of shape ({len(x)},), got {getattr(labels, 'shape', labels)!r}")
    classes = network.layers[-1].weight.shape[0]
    if len(labels) and not (0 <= int(labels.min()) and int(labels.max()) < classes):
        raise ValueError(f"labels must be in [0, {classes - 1}]")
    return x, labels.long()


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
