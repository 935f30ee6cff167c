"""Certified ADMM weight quantization (Weng et al. 2020) and the LB baseline (Leng et al. 2018).

Weng, Zhao, Liu, Chen, Lin and Daniel, "Towards Certificated Model Robustness Against Weight
Perturbations" (AAAI 2020), problem (16)-(18): quantize layer k's weights to ``d_k`` bits,
W^(k) = q^(k) V^(k) with codes V^(k) in D^(k) = {-2^(d_k-2), ..., 2^(d_k-2)} and one scale q^(k) > 0,
minimising the training loss f subject to the certificate box ||q^(k) V^(k) - C^(k)||_inf <= eps_c^(k)
around the float weights C^(k) (eps_c^(k) from the certified weight-perturbation bound; None drops the
constraint, which is problem (15)). ADMM on the split G = V (Proposition 1), one iteration::

    G-step (22): projected SGD on f(q G) + (rho / 2) ||q (G - V + u)||^2, with q G kept in [C - eps, C + eps]
    q-step (23): projected gradient on f(q G) over q in the interval where |q G - C| <= eps still holds
    V-step (24): V = round and clip G + u to D (and, when a certificate is given, to the codes inside the box)
    dual:        u += G - V                      (u = U / rho, the scaled multiplier)

Implementation choices (all documented deviations from the text):
- The augmented term is measured in weight units, (rho / 2) ||q (G - V + u)||^2, i.e. the paper's rho
  per layer is rho q^2: one rho then fits every layer and bit width. SGD runs on W = q G (a
  preconditioned G-step with the same minimiser). u is rescaled whenever q or rho changes, so the
  unscaled multiplier U stays put, as ADMM with a varying penalty requires.
- The paper's (24) writes B = G - U / rho; with its Lagrangian + U^T (G - V) the minimiser is
  B = G + U / rho, which we use.
- Problem (17) puts the certificate on q V; the splitting moves it to q G, and so do we by default.
  ``box_codes=True`` keeps it on both (an equivalent reformulation since G = V): the V-step then projects
  every code onto D intersected with the box, elementwise and in closed form (where the box holds no
  code, eps < q / 2 between two grid points, the code nearest to the box), and q is kept
  >= (max |C| - eps) / 2^(d-2) (from the start, and in the q-step where compatible with (23)) so that
  every box reaches the grid's range. Either way ``box_violation`` reports how far the result is off.
- Only Linear/Conv2d weights are optimised; biases and every other parameter stay as trained, and the
  model runs in evaluation mode (the certificate is about the weights of the given model).
- rho grows by ``rho_growth`` per iteration, as is usual for ADMM quantization, to drive G to V.

The LB method (Leng et al., "Extremely Low Bit Neural Network: Squeeze the Last Bit Out with ADMM",
AAAI 2018) is the same loop with the auxiliary variable a copy of the weights: the G-step trains W with
(rho / 2) ||W - Z + U||^2 and the Z-step projects W + U onto the scaled grid {q D} by alternating the
least-squares scale and the rounded codes (``qrobust.quant.lowbit``'s projection), U += W - Z.
It has no certificate constraint.

Both start from the same point: the codes and scale of the projection of the float weights.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from qrobust.bounds.certify import certified_eps
from qrobust.bounds.network import ReluNetwork
from qrobust.data import LatticeDataset
from qrobust.errors import CheckpointError
from qrobust.graph import check_supported, trace
from qrobust.models.checkpoint import read_archive, write_archive
from qrobust.models.layers import Normalize
from qrobust.progress import progress_bar
from qrobust.quant.lowbit import LowBitWeight, alternating_codes

METHODS = ("admm", "lb")
MAX_BITS = 8  # codes up to +-64 fit int8
CODES_FORMAT = "qrobust-admm-codes"
CODES_FORMAT_VERSION = 1


def grid_top(bits: int) -> int:
    """The largest code 2^(bits-2) of the paper's ``bits``-bit grid D = {-2^(bits-2), ..., 2^(bits-2)}."""
    _check_bits(bits)
    return 2 ** (bits - 2)


def quantizable_layers(model: nn.Module) -> list[tuple[str, nn.Conv2d | nn.Linear]]:
    """The Linear and Conv2d modules of ``model`` by qualified name, in the order forward calls them
    (``qrobust.graph``; a module called twice counts once), the order of ``qrobust.bounds``' layers."""
    # graph.affine() holds the conv and linear layers
    return [
        (layer.name, cast(nn.Conv2d | nn.Linear, layer.module))
        for layer in trace(model).affine()
        if layer.name == layer.target
    ]


@dataclass(frozen=True)
class ADMMConfig:
    """How ``admm_quantize`` runs.

    Args:
        bits: weight bits d_k in 2..8 (D = +-2^(d_k-2), so 8 bits use codes -64..64 and 4 bits -4..4):
            one for all layers, one per layer by name ({"conv1": 8, "fc": 4}), or a tuple in the
            forward order of ``quantizable_layers``.
        method: "admm" (Weng et al. 2020, certificate-aware) or "lb" (Leng et al. 2018).
        iterations: ADMM iterations, >= 1.
        steps: SGD steps (minibatches) of the G-step per iteration, >= 1.
        rho: augmented-Lagrangian penalty in weight units (> 0), at the first iteration.
        rho_growth: factor applied to rho after every iteration, >= 1.
        lr: SGD learning rate of the G-step (> 0).
        momentum: SGD momentum of the G-step, in [0, 1).
        batch_size: training images per SGD step, >= 1.
        scale_steps: projected-gradient steps of the q-step ("admm"), or alternations of the scale /
            code projection ("lb" and the initial projection of both), >= 1.
        scale_lr: step size of the q-step on log q (dimensionless: d f / d log q is the loss change
            per relative change of the layer's scale), > 0.
        eval_images: training images on which each iteration's training accuracy is measured, >= 1.
        box_codes: with a certificate, also keep the codes' weights q V in the box (True), so it holds
            at the end wherever the box contains a grid point; False (default) is the paper's splitting,
            which binds only the continuous q G (the box then regularises training, and the final
            rounding may leave it by up to half a grid step).
        seed: seed of the minibatch order and of the evaluation subset.
    """

    bits: int | tuple[int, ...] | Mapping[str, int] = 8
    method: str = "admm"
    iterations: int = 20
    steps: int = 100
    rho: float = 0.01
    rho_growth: float = 1.2
    lr: float = 0.01
    momentum: float = 0.9
    batch_size: int = 128
    scale_steps: int = 10
    scale_lr: float = 0.01
    eval_images: int = 1000
    box_codes: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        bits = tuple(self.bits.values()) if isinstance(self.bits, Mapping) else self.bits
        bits = bits if isinstance(bits, tuple) else (bits,)
        if not bits:
            raise ValueError("bits must be an integer or a non-empty tuple of integers, got ()")
        for value in bits:
            _check_bits(value)
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(map(repr, METHODS))}, got {self.method!r}")
        for name in ("iterations", "steps", "batch_size", "scale_steps", "eval_images"):
            _check_int(name, getattr(self, name), 1)
        _check_int("seed", self.seed, 0)
        for name in ("rho", "lr", "scale_lr"):
            if not _finite(getattr(self, name)) or getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a finite number > 0, got {getattr(self, name)!r}")
        if not _finite(self.rho_growth) or self.rho_growth < 1:
            raise ValueError(f"rho_growth must be a finite number >= 1, got {self.rho_growth!r}")
        if not isinstance(self.box_codes, bool):
            raise ValueError(f"box_codes must be True or False, got {self.box_codes!r}")
        if not _finite(self.momentum) or not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum!r}")

    def layer_bits(self, names: Sequence[str]) -> tuple[int, ...]:
        """The bits of each layer of ``names`` (call order); raises ValueError if a per-layer tuple has
        another length or a mapping names other layers."""
        if isinstance(self.bits, Mapping):
            if set(self.bits) != set(names):
                raise ValueError(
                    f"bits names layers {sorted(self.bits)} but the model's Linear/Conv2d layers are {list(names)}"
                )
            return tuple(self.bits[name] for name in names)
        if not isinstance(self.bits, tuple):
            return (self.bits,) * len(names)
        if len(self.bits) != len(names):
            raise ValueError(f"bits has {len(self.bits)} entries but the model has {len(names)} Linear/Conv2d layers")
        return self.bits


@dataclass(frozen=True)
class IterationStats:
    """One ADMM iteration (0: the initial projection), measured on the quantized model q V.

    ``residual`` is max_k ||W^(k) - q^(k) V^(k)||_inf / q^(k), the continuous weights' largest distance
    to their codes in grid steps; it goes to 0 as ADMM converges.
    """

    iteration: int
    rho: float
    loss: float | None  # mean G-step training loss (None at iteration 0)
    train_accuracy: float
    test_accuracy: float | None
    residual: float
    seconds: float


@dataclass(frozen=True)
class ADMMLayer:
    """One quantized layer: the weight is ``scale * codes`` exactly, codes in +-2^(bits-2).

    ``box_violation`` is max(|scale * codes - C| - eps, 0) over the layer (0: the certificate box holds
    everywhere) and ``box_feasible`` the fraction of weights whose box holds a code at all; both are
    None without a certificate.
    """

    name: str
    bits: int
    codes: torch.Tensor  # int8, the weight's shape
    scale: torch.Tensor  # 0-dim, the weight's dtype
    epsilon: float | None
    box_violation: float | None
    box_feasible: float | None

    def lowbit(self) -> LowBitWeight:
        """Codes and scale as ``qrobust.quant.LowBitWeight``."""
        return LowBitWeight(self.codes, self.scale)

    def dequantize(self) -> torch.Tensor:
        return self.codes.to(self.scale.dtype) * self.scale


@dataclass(frozen=True)
class ADMMResult:
    """The quantized model (every Linear/Conv2d weight exactly ``scale * codes``), its layers and the history."""

    model: nn.Module
    layers: tuple[ADMMLayer, ...]
    history: tuple[IterationStats, ...]
    config: ADMMConfig

    def export(self) -> dict[str, LowBitWeight]:
        """Integer codes and scale by module name."""
        return {layer.name: layer.lowbit() for layer in self.layers}

    def summary(self) -> dict[str, Any]:
        """A JSON-ready record: config, per-layer bits / scale / epsilon / box facts, and the history."""
        return {
            "config": asdict(self.config),
            "layers": [
                {
                    "name": layer.name,
                    "bits": layer.bits,
                    "scale": float(layer.scale),
                    "epsilon": layer.epsilon,
                    "box_violation": layer.box_violation,
                    "box_feasible": layer.box_feasible,
                }
                for layer in self.layers
            ],
            "history": [asdict(stats) for stats in self.history],
        }


class _Layer:
    """ADMM state of one layer; ``weight`` is W = q G (weight units), ``codes`` V, ``dual`` the scaled
    multiplier (code units u for "admm", weight units U for "lb")."""

    def __init__(self, name: str, center: torch.Tensor, bits: int, epsilon: float | None, config: ADMMConfig) -> None:
        self.name, self.center, self.bits, self.epsilon = name, center, bits, epsilon
        self.boxed_codes = epsilon is not None and config.box_codes  # the certificate also binds q V
        self.top = grid_top(bits)
        self.codes, self.scale = _project(center, self.top, config.scale_steps)
        # Codes in the box need a grid that reaches every box: q top >= |C| - eps.
        self.scale_floor = 0.0
        if epsilon is not None and self.boxed_codes:
            self.scale_floor = max(float(center.abs().max()) - epsilon, 0.0) / self.top
        if self.boxed_codes:
            self.scale = torch.clamp(self.scale, min=self.scale_floor)
            self.codes = self.project_codes(center / self.scale)
        self.weight = center.clone().requires_grad_(True)
        self.dual = torch.zeros_like(center)

    def quantized(self) -> torch.Tensor:
        return self.scale * self.codes

    def target(self, method: str) -> torch.Tensor:
        """What the G-step's penalty pulls W towards, in weight units."""
        return self.scale * (self.codes - self.dual) if method == "admm" else self.quantized() - self.dual

    def project_weight(self) -> None:
        """The G-step's box: C - eps <= W <= C + eps."""
        if self.epsilon is not None:
            with torch.no_grad():
                self.weight.copy_(torch.clamp(self.weight, self.center - self.epsilon, self.center + self.epsilon))

    def scale_interval(self, g: torch.Tensor) -> tuple[float, float]:
        """(23): the q with |q G - C| <= eps for all entries, given G (always holding the current q), and
        q >= ``scale_floor`` where that is compatible."""
        q = float(self.scale)
        if self.epsilon is None:
            return 0.0, math.inf
        low, high = (self.center - self.epsilon) / g, (self.center + self.epsilon) / g  # (...), swapped where g < 0
        lower = torch.where(g > 0, low, high)[g != 0]
        upper = torch.where(g > 0, high, low)[g != 0]
        lo = float(lower.max()) if lower.numel() else 0.0
        hi = float(upper.min()) if upper.numel() else math.inf
        lo, hi = min(max(lo, 0.0), q), max(hi, q)
        return (max(lo, self.scale_floor) if self.scale_floor <= hi else lo), hi

    def code_box(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The certificate box in code units (l, h) and the codes inside it and D (ceil l .. floor h)."""
        epsilon = self.epsilon
        assert epsilon is not None  # only a layer with a radius has a box
        low, high = (self.center - epsilon) / self.scale, (self.center + epsilon) / self.scale
        return low, high, torch.ceil(low).clamp(min=-self.top), torch.floor(high).clamp(max=self.top)

    def project_codes(self, b: torch.Tensor) -> torch.Tensor:
        """(24): the nearest code of D to ``b`` (code units), inside the certificate box where it holds one."""
        if not self.boxed_codes:
            return torch.clamp(torch.round(b), -self.top, self.top)
        low, high, first, last = self.code_box()
        inside = torch.clamp(torch.round(b), first, last)  # nearest integer of [first, last] to b
        nearest_to_box = torch.clamp(torch.round(torch.clamp(b, low, high)), -self.top, self.top)
        return torch.where(first <= last, inside, nearest_to_box)

    def finish(self) -> ADMMLayer:
        violation = feasible = None
        if self.epsilon is not None:
            excess = (self.quantized() - self.center).abs() - self.epsilon
            violation = float(excess.clamp(min=0).max())
            _, _, first, last = self.code_box()
            feasible = float((first <= last).float().mean())
        return ADMMLayer(
            self.name, self.bits, self.codes.to(torch.int8), self.scale.clone(), self.epsilon, violation, feasible
        )


def admm_quantize(
    model: nn.Module,
    train_set: LatticeDataset,
    config: ADMMConfig,
    *,
    epsilons: Mapping[str, float | None] | None = None,
    test_set: LatticeDataset | None = None,
    progress: bool = False,
) -> ADMMResult:
    """Quantize every Linear/Conv2d weight of a copy of ``model`` to the paper's ``config.bits``-bit grid.

    Args:
        model: a trained float model on [0, 1] images (N, C, H, W); it is not modified.
        train_set: the training images f is measured on.
        config: the method and its hyperparameters.
        epsilons: the certificate radii eps_c^(k) by layer name (l_inf, weight units; None, or a layer
            left out: no constraint), e.g. ``certificate_epsilons``. Keyed by name, never by position, so
            a radius always lands on the layer it was computed for. Only for method "admm".
        test_set: if given, each iteration also records the test accuracy (for the paper's Fig. 2).
        progress: show a progress bar.

    Returns the quantized copy (weights exactly scale * codes), per-layer codes and scales, and the
    history (iteration 0 is the initial projection of the float weights).
    """
    check_supported(model, None, "admm")
    layers_found = quantizable_layers(model)
    if not layers_found:
        raise ValueError(f"{type(model).__name__} has no Linear or Conv2d layers to quantize")
    bits = config.layer_bits([name for name, _ in layers_found])
    radii = _check_epsilons(epsilons, [name for name, _ in layers_found], config.method)
    model = copy.deepcopy(model).eval()
    model.requires_grad_(False)
    layers = [
        _Layer(name, module.weight.detach().clone(), b, eps, config)
        for (name, module), b, eps in zip(layers_found, bits, radii, strict=True)
    ]
    generator = torch.Generator().manual_seed(config.seed)
    evaluation = train_set.subset(min(config.eval_images, len(train_set)), config.seed)
    optimizer = torch.optim.SGD([layer.weight for layer in layers], lr=config.lr, momentum=config.momentum)
    rho = config.rho
    history = [_record(model, layers, 0, rho, None, evaluation, test_set, time.perf_counter())]
    with progress_bar(progress) as bar:
        task = bar.add_task(
            f"{config.method} {bits[0]}-bit" if len(set(bits)) == 1 else config.method,
            total=config.iterations,
            status="",
        )
        for iteration in range(1, config.iterations + 1):
            started = time.perf_counter()
            loss = _g_step(model, layers, train_set, config, rho, optimizer, generator)
            if config.method == "admm":
                _admm_second_block(model, layers, train_set, config, generator)
            else:
                _lb_second_block(layers, config)
            history.append(_record(model, layers, iteration, rho, loss, evaluation, test_set, started))
            bar.update(task, advance=1, status=_describe(history[-1]))
            rho *= config.rho_growth
            for layer in layers:
                layer.dual /= config.rho_growth  # the unscaled multiplier rho * dual stays put
    with torch.no_grad():
        for (_, module), layer in zip(quantizable_layers(model), layers, strict=True):  # the copy's modules
            module.weight.copy_(layer.quantized())
    return ADMMResult(model, tuple(layer.finish() for layer in layers), tuple(history), config)


def _g_step(model, layers, train_set, config, rho, optimizer, generator) -> float:
    """(22): ``config.steps`` projected SGD steps on f(W) + (rho / 2) sum_k ||W_k - target_k||^2."""
    targets = [layer.target(config.method).detach() for layer in layers]
    total = 0.0
    for _ in range(config.steps):
        images, labels = _batch(train_set, config.batch_size, generator)
        loss = _loss(model, layers, [layer.weight for layer in layers], images, labels)
        penalty = sum(((layer.weight - target) ** 2).sum() for layer, target in zip(layers, targets, strict=True))
        optimizer.zero_grad(set_to_none=True)
        (loss + rho / 2 * penalty).backward()
        optimizer.step()
        for layer in layers:
            layer.project_weight()
        total += loss.item()
    return total / config.steps


def _admm_second_block(model, layers, train_set, config, generator) -> None:
    """(23), (24) and the dual update of Weng et al.: the q-step, the V-step, u += G - V."""
    with torch.no_grad():
        g = [layer.weight.detach() / layer.scale for layer in layers]  # G(t+1), code units
    intervals = [layer.scale_interval(gk) for layer, gk in zip(layers, g, strict=True)]
    log_scale = torch.tensor([math.log(float(layer.scale)) for layer in layers], requires_grad=True)  # (K,)
    for _ in range(config.scale_steps):
        images, labels = _batch(train_set, config.batch_size, generator)
        weights = [torch.exp(log_scale[k]) * g[k] for k in range(len(layers))]
        (gradient,) = torch.autograd.grad(_loss(model, layers, weights, images, labels), log_scale)
        with torch.no_grad():
            log_scale -= config.scale_lr * gradient
            for k, (lo, hi) in enumerate(intervals):
                log_scale[k] = math.log(min(max(math.exp(float(log_scale[k])), lo), hi))
    with torch.no_grad():
        for k, layer in enumerate(layers):
            old, layer.scale = layer.scale, torch.exp(log_scale[k]).to(layer.scale.dtype)
            layer.dual *= (old / layer.scale) ** 2  # the paper's rho is rho q^2: keep U = rho q^2 u
            layer.codes = layer.project_codes(g[k] + layer.dual)
            layer.dual += g[k] - layer.codes
            layer.weight.copy_(layer.scale * g[k])  # W = q G with the new q: the next G-step's start


def _lb_second_block(layers, config) -> None:
    """Leng et al.'s Z-step, Z = Proj_{q D}(W + U) by alternating scale and codes, and U += W - Z."""
    with torch.no_grad():
        for layer in layers:
            layer.codes, layer.scale = _project(layer.weight + layer.dual, layer.top, config.scale_steps)
            layer.dual += layer.weight - layer.quantized()


def _project(weight: torch.Tensor, top: int, iterations: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The (near-)closest scale * codes to ``weight`` with codes in -top..top (float codes, 0-dim scale)."""
    codes, scale = alternating_codes(weight.detach().double().flatten(), top, iterations, weight.dtype)
    scale = scale.to(weight.dtype)
    if scale == 0:  # an all-zero weight: any positive scale will do
        scale = torch.ones((), dtype=weight.dtype)
    return codes.to(weight.dtype).view_as(weight), scale


def _loss(model, layers, weights, images, labels) -> torch.Tensor:
    """Mean cross-entropy of ``model`` with the layers' weights replaced by ``weights``."""
    parameters = {f"{layer.name}.weight": weight for layer, weight in zip(layers, weights, strict=True)}
    return F.cross_entropy(functional_call(model, parameters, (images,)), labels)


def _batch(data: LatticeDataset, size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    index = torch.randint(len(data), (min(size, len(data)),), generator=generator)
    return data.images[index].float() / 255, data.labels[index]  # (B, C, H, W) in [0, 1], (B,)


@torch.no_grad()
def _accuracy(model, layers, data: LatticeDataset) -> float:
    parameters = {f"{layer.name}.weight": layer.quantized() for layer in layers}
    correct = 0
    for start in range(0, len(data), 1000):
        logits = functional_call(model, parameters, (data.images[start : start + 1000].float() / 255,))
        correct += int((logits.argmax(1) == data.labels[start : start + 1000]).sum())
    return correct / len(data)


def _record(model, layers, iteration, rho, loss, evaluation, test_set, started) -> IterationStats:
    with torch.no_grad():
        residual = max(float((layer.weight - layer.quantized()).abs().max() / layer.scale) for layer in layers)
    test = None if test_set is None else _accuracy(model, layers, test_set)
    return IterationStats(
        iteration, rho, loss, _accuracy(model, layers, evaluation), test, residual, time.perf_counter() - started
    )


def _describe(stats: IterationStats) -> str:
    test = "" if stats.test_accuracy is None else f" test {stats.test_accuracy:.3f}"
    return f"loss {stats.loss:.3f} train {stats.train_accuracy:.3f}{test} residual {stats.residual:.2f}"


def certified_layer_bounds(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """The certified l_inf bound (N,) of each Linear/Conv2d layer perturbed alone, per input, by layer
    name (``qrobust.bounds.certified_eps``: within it, the prediction stays ``labels``).

    In the model's weight units: the layer reading the normalised input, whose bound is computed with
    Normalize folded in (W / std), is scaled back by the smallest channel std, which keeps |dW / std|
    within it. Only this helper and ``certificate_epsilons`` need ``qrobust.bounds``; ``admm_quantize``
    takes the radii as plain numbers.
    """
    network = ReluNetwork.from_model(model)
    bounds = {name: certified_eps(network, images, labels, layers=(k,)).float() for k, name in enumerate(network.names)}
    normalize = next(
        (cast(Normalize, layer.module) for layer in trace(model).layers if layer.kind == "normalize"), None
    )
    if normalize is not None:
        bounds[network.names[0]] = bounds[network.names[0]] * float(normalize.std.min())
    return bounds


def certificate_epsilons(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, percentile: float
) -> dict[str, float]:
    """eps_c^(k) for every Linear/Conv2d layer by name: the ``percentile`` (0..100) of its certified
    bounds (``certified_layer_bounds``) over ``images``.

    The paper takes 100 training images; pass ones the model classifies correctly, since the bound
    certifies that a correct prediction stays (it is 0 for the others).
    """
    if not _finite(percentile) or not 0 <= percentile <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {percentile!r}")
    bounds = certified_layer_bounds(model, images, labels)
    return {name: float(np.percentile(bound.cpu().numpy(), percentile)) for name, bound in bounds.items()}


def save_codes(path: str | Path, result: ADMMResult, metadata: dict[str, Any] | None = None) -> int:
    """Write the integer codes (int8) and scales of ``result`` with JSON ``metadata``; returns the size.

    The file is a tensors-only ``torch.save`` archive, read back by ``load_codes`` with ``weights_only``.
    """
    payload = {
        "format": CODES_FORMAT,
        "format_version": CODES_FORMAT_VERSION,
        "metadata": json.dumps((metadata or {}) | {"quantization": result.summary()}),
        "codes": {layer.name: layer.codes for layer in result.layers},
        "scales": {layer.name: layer.scale for layer in result.layers},
    }
    return write_archive(Path(path), payload)


def load_codes(path: str | Path) -> tuple[dict[str, LowBitWeight], dict[str, Any]]:
    """The codes and scales written by ``save_codes`` by module name, and the metadata."""
    payload = read_archive(path, CODES_FORMAT, CODES_FORMAT_VERSION, "quantized-codes file")
    try:
        codes, scales = payload["codes"], payload["scales"]
        if set(codes) != set(scales) or any(codes[name].dtype != torch.int8 for name in codes):
            raise ValueError("codes and scales do not match")
        return {name: LowBitWeight(codes[name], scales[name]) for name in codes}, json.loads(payload["metadata"])
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise CheckpointError(f"{path} is corrupt: {error}") from None


def _check_epsilons(epsilons, names: list[str], method: str) -> list[float | None]:
    """The radius of each layer of ``names`` (None: unconstrained) from a mapping by layer name."""
    if epsilons is None:
        return [None] * len(names)
    if not isinstance(epsilons, Mapping):
        raise TypeError(
            f"epsilons must map layer names to radii (e.g. {{{names[0]!r}: 0.01}}), got {type(epsilons).__name__}"
        )
    unknown = sorted(set(epsilons) - set(names))
    if unknown:
        raise ValueError(f"epsilons names {unknown}, which are not Linear/Conv2d layers of the model: {names}")
    for eps in epsilons.values():
        if eps is not None and (not _finite(eps) or eps < 0):
            raise ValueError(f"epsilons must be finite numbers >= 0 or None, got {eps!r}")
    if method != "admm" and any(eps is not None for eps in epsilons.values()):
        raise ValueError(f"method {method!r} (Leng et al. 2018) has no certificate constraint; pass epsilons=None")
    return [None if epsilons.get(name) is None else float(epsilons[name]) for name in names]


def _check_bits(bits: object) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an integer in 2..{MAX_BITS} (codes +-2^(bits-2) fit int8), got {bits!r}")


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _finite(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
