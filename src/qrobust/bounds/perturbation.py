"""What may change in a network: l_p weight perturbations of chosen layers, and elementwise noise boxes.

Weng et al., "Towards Certificated Model Robustness Against Weight Perturbations" (AAAI 2020), eq. 4
and Theorem 0.1: the weights of layer k move inside a ball of radius eps_k around their trained values,
one ball per output unit (a row of a Linear weight, the kernel of one output channel of a Conv2d). For
the l_inf norm this is the elementwise box |W_hat - W| <= eps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class WeightPerturbation:
    """Weights of ``layers`` perturbed by at most ``eps`` in the l_``norm`` norm, per output unit.

    Layer k is the k-th Linear/Conv2d module of the model in forward order, 0-based (``ReluNetwork``
    numbering). Layer 0 is the first layer with the model's Normalize folded in (W / std), i.e. the
    weights the int8 engine quantizes.

    Args:
        layers: indices of the perturbed layers, distinct, >= 0.
        eps: radius, one for all layers or one per layer (same order as ``layers``), >= 0.
        norm: p >= 1 of the l_p ball of each output unit's weights (default inf: elementwise box).
        bias: whether the biases move too; each bias joins its unit's weights in one l_p ball.
    """

    layers: tuple[int, ...]
    eps: float | tuple[float, ...]
    norm: float = math.inf
    bias: bool = False

    def __post_init__(self) -> None:
        layers = tuple(self.layers) if isinstance(self.layers, (list, tuple)) else self.layers
        if (
            not isinstance(layers, tuple)
            or not layers
            or any(isinstance(k, bool) or not isinstance(k, int) or k < 0 for k in layers)
            or len(set(layers)) != len(layers)
        ):
            raise ValueError(f"layers must be a non-empty tuple of distinct integers >= 0, got {self.layers!r}")
        object.__setattr__(self, "layers", layers)
        eps = tuple(self.eps) if isinstance(self.eps, (list, tuple)) else self.eps
        values = eps if isinstance(eps, tuple) else (eps,)
        if isinstance(eps, tuple) and len(eps) != len(layers):
            raise ValueError(f"eps must be one number or one per layer ({len(layers)}), got {self.eps!r}")
        if any(isinstance(e, bool) or not isinstance(e, (int, float)) or not (0 <= e < math.inf) for e in values):
            raise ValueError(f"eps must be finite and >= 0, got {self.eps!r}")
        object.__setattr__(self, "eps", eps)
        check_norm(self.norm)
        if not isinstance(self.bias, bool):
            raise ValueError(f"bias must be a bool, got {self.bias!r}")

    def eps_of(self, layer: int) -> float:
        """The radius of ``layer`` (0.0 for a layer that is not perturbed)."""
        if layer not in self.layers:
            return 0.0
        return float(self.eps[self.layers.index(layer)] if isinstance(self.eps, tuple) else self.eps)


@dataclass(frozen=True)
class AffineNoise:
    """Elementwise uncertainty of one affine layer and of the values it reads, for interval propagation.

    The layer computes W_hat a_hat + b_hat with |W_hat - W| <= ``weight_radius`` and
    |b_hat - b| <= ``bias_radius`` elementwise, where a_hat = clamp(a + n, *``input_range``) for the
    exact input a and some |n| <= ``input_noise`` (e.g. rounding to an activation grid, then clipping
    to its range). Used to bound a quantized network by its float twin (``verify_quantization``).

    Args:
        weight_radius: tensor shaped like the layer's weight, >= 0, or None (no weight change).
        bias_radius: tensor (O,) >= 0, or None.
        input_noise: >= 0, in the units of the layer's input.
        input_range: (low, high) the noisy input is clamped to, or None.
    """

    weight_radius: torch.Tensor | None = None
    bias_radius: torch.Tensor | None = None
    input_noise: float = 0.0
    input_range: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        for name in ("weight_radius", "bias_radius"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, torch.Tensor) or not bool(torch.all(value >= 0))):
                raise ValueError(f"{name} must be a tensor >= 0 or None, got {value!r}")
        if not (isinstance(self.input_noise, (int, float)) and 0 <= self.input_noise < math.inf):
            raise ValueError(f"input_noise must be finite and >= 0, got {self.input_noise!r}")
        if self.input_range is not None and not (
            len(self.input_range) == 2 and self.input_range[0] <= self.input_range[1]
        ):
            raise ValueError(f"input_range must be (low, high) with low <= high, got {self.input_range!r}")


def check_norm(norm: float) -> None:
    """Raise ValueError unless ``norm`` is a p >= 1 (inf allowed)."""
    if isinstance(norm, bool) or not isinstance(norm, (int, float)) or not norm >= 1:
        raise ValueError(f"norm must be a number p >= 1 (inf allowed), got {norm!r}")


def dual_norm(norm: float) -> float:
    """q with 1/p + 1/q = 1 (Hoelder's inequality): inf -> 1, 1 -> inf, 2 -> 2."""
    if math.isinf(norm):
        return 1.0
    return math.inf if norm == 1 else norm / (norm - 1)
