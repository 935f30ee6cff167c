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
Bounder = Callable[[torch.Tensor], torch.Tensor]  # per-input eps scale (N,) -> margin lower bounds (N, classes)


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
    return bound(torch.ones(len(x), dtype=network.dtype))


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
        flags.append(bound(torch.ones(len(chunk), dtype=network.dtype)).amin(1) > 0)
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
    rtol: float = 1e-3,
    batch_size: int = 256,
) -> torch.Tensor:
    """The largest certified weight radius eps of each input (problem 6), by bisection on log eps.

    Guarantee: ``certify(..., WeightPerturbation(layers, eps, norm, bias), method=method)`` holds at the
    returned eps for every input, all ``layers`` perturbed by the same eps: the prediction stays
    ``labels`` for every weight change within it. The value is 0 where even ``eps_range[0]`` is not
    certified (e.g. a misclassified input) and ``eps_range[1]`` where the upper end is; otherwise it is
    within a factor 1 + ``rtol`` of a radius that is not certified. Interval bounds bracket the radius
    first (they are cheap); linear bounds then search upwards from there in steps of 4x and bisect,
    so they are only evaluated near the answer, where few neurons are unstable.
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
    """Per-input search of the largest certified eps in [low, high] (0 if ``low`` is not certified)."""

    def tester(kind: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        def certified_at(eps: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
            if len(index) == 0:
                return torch.zeros(0, dtype=torch.bool)
            return _bounder(network, x[index], labels[index], perturbation, kind)(eps).amin(1) > 0

        return certified_at

    interval = tester("interval")
    everyone = torch.arange(len(x))
    lo = torch.full((len(x),), low, dtype=network.dtype)
    hi = torch.full((len(x),), high, dtype=network.dtype)
    at_low, at_high = interval(lo, everyone), interval(hi, everyone)
    inside = torch.nonzero(at_low & ~at_high).flatten()
    lo[inside] = _bisect(interval, inside, lo[inside], hi[inside], rtol)
    result = torch.where(at_high, high, torch.where(at_low, lo, 0.0)).to(network.dtype)
    if method == "interval":
        return result
    linear = tester("linear")
    lo = result.clone()
    fresh = torch.nonzero(~at_low).flatten()  # not certified at ``low`` by interval bounds: try linear ones
    lo[fresh[linear(torch.full((len(fresh),), low, dtype=network.dtype), fresh)]] = low
    rest = torch.nonzero(~at_high & (lo > 0)).flatten()
    hi = lo.clone()
    while len(rest):  # grow by 4x until a radius is not certified (or the upper end is)
        hi[rest] = torch.clamp(lo[rest] * 4, max=high)
        ok = linear(hi[rest], rest)
        lo[rest[ok]] = hi[rest[ok]]
        rest = rest[ok & (hi[rest] < high)]
    grown = torch.nonzero(hi > lo).flatten()
    lo[grown] = _bisect(linear, grown, lo[grown], hi[grown], rtol)
    return lo


def _bisect(certified_at, index: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, rtol: float) -> torch.Tensor:
    """Bisection on log eps of entries ``index``: ``lo`` certified, ``hi`` not; stops at hi / lo <= 1 + rtol."""
    lo, hi = lo.clone(), hi.clone()
    while True:
        todo = torch.nonzero(hi > lo * (1 + rtol)).flatten()
        if len(todo) == 0:
            return lo
        mid = torch.sqrt(lo[todo] * hi[todo])
        ok = certified_at(mid, index[todo])
        lo[todo] = torch.where(ok, mid, lo[todo])
        hi[todo] = torch.where(ok, hi[todo], mid)


def _bounder(network: ReluNetwork, x: torch.Tensor, labels: torch.Tensor, perturbation: WeightPerturbation, method: str) -> Bounder:
    """Margin lower bounds as a function of a per-input scale of ``perturbation``'s radii; linear bounds
    also take the interval ones into account (both are sound, the larger is kept)."""

    def interval(scale: torch.Tensor) -> torch.Tensor:
        balls = {k: LayerBall(scale * perturbation.eps_of(k), perturbation.norm, perturbation.bias) for k in perturbation.layers}
        with torch.no_grad():
            return interval_margins(network, x, labels, balls)

    if method == "interval":
        return interval
    (layer,) = perturbation.layers
    single = SingleLayerBound(network, x, layer, perturbation.norm, perturbation.bias)
    return lambda scale: torch.maximum(single.margins(scale * perturbation.eps_of(layer), labels), interval(scale))


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
