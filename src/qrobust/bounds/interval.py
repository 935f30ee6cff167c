"""Interval bound propagation (IBP) under weight perturbations of several layers and bounded noise.

Weng et al., "Towards Certificated Model Robustness Against Weight Perturbations" (AAAI 2020),
section "Certified lower bound: multi-layer perturbation": every value is kept as a box [lower, upper];
an affine layer whose weights move by an l_p ball of radius eps per output unit (plus, optionally, an
elementwise box of radius R, and its input by bounded noise) maps the box with centre c, radius r and
magnitude m = |c| + r to the centre W c + b and the radius

    |W| r + eps ||[m, 1 if bias]||_q + R m + R_b        (1/p + 1/q = 1, Hoelder),

since |W_hat a - W c| <= |W| |a - c| + |W_hat - W| |a| for every a in the box. ReLU, max pooling,
flattening and clamping are monotone and map the box endpoints. The last layer is bounded directly
on the margins f_c - f_j, which is tighter than bounding each logit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from qrobust.bounds.network import Affine, ReluNetwork
from qrobust.bounds.perturbation import AffineNoise, dual_norm

Box = tuple[torch.Tensor, torch.Tensor]  # (lower, upper), same shape


@dataclass(frozen=True)
class LayerBall:
    """Per-input l_p weight radius of one layer, for batched bisection: eps (N,), norm p, bias in the ball."""

    eps: torch.Tensor
    norm: float
    bias: bool


def interval_margins(
    network: ReluNetwork,
    images: torch.Tensor,
    labels: torch.Tensor,
    balls: Mapping[int, LayerBall] | None = None,
    noise: Mapping[int, AffineNoise] | None = None,
) -> torch.Tensor:
    """Lower bounds (N, classes) of f_label - f_j over every perturbation; +inf in the label's column.

    ``images`` are [0, 1] floats in the network's dtype; ``balls[k]`` and ``noise[k]`` describe layer k.
    """
    lower, upper = _last_input_box(network, images, balls or {}, noise or {})
    return margin_step(network.num_layers - 1, network.layers[-1], lower, upper, labels, balls or {}, noise or {})


def interval_logits(
    network: ReluNetwork,
    images: torch.Tensor,
    balls: Mapping[int, LayerBall] | None = None,
    noise: Mapping[int, AffineNoise] | None = None,
) -> Box:
    """Lower and upper bounds (N, classes) of every logit over every perturbation."""
    balls, noise = balls or {}, noise or {}
    k = network.num_layers - 1
    lower, upper = _last_input_box(network, images, balls, noise)
    center, radius = affine_box(network.layers[-1], *_noisy(lower, upper, noise.get(k)), balls.get(k), noise.get(k))
    return center - radius, center + radius


def _last_input_box(
    network: ReluNetwork, images: torch.Tensor, balls: Mapping[int, LayerBall], noise: Mapping[int, AffineNoise]
) -> Box:
    """The box of the last layer's input, propagated from the exact images through every op before it."""
    lower = upper = images
    layer = 0
    for op in network.ops[:-1]:
        if isinstance(op, Affine):
            center, radius = affine_box(op, *_noisy(lower, upper, noise.get(layer)), balls.get(layer), noise.get(layer))
            lower, upper = center - radius, center + radius
            layer += 1
        else:
            lower, upper = op(lower), op(upper)  # ReLU, MaxPool and Flatten are monotone
    return lower, upper


def _noisy(lower: torch.Tensor, upper: torch.Tensor, noise: AffineNoise | None) -> Box:
    """The box widened by the input noise, then clamped to the input range."""
    if noise is None:
        return lower, upper
    lower, upper = lower - noise.input_noise, upper + noise.input_noise
    if noise.input_range is not None:
        low, high = noise.input_range
        lower, upper = lower.clamp(low, high), upper.clamp(low, high)
    return lower, upper


def affine_box(
    layer: Affine, lower: torch.Tensor, upper: torch.Tensor, ball: LayerBall | None, noise: AffineNoise | None
) -> Box:
    """Centre and radius of the layer's output over its input box and weight uncertainty (module docstring)."""
    lower, upper = layer.pad(lower), layer.pad(upper)  # pad values are exact
    center, radius = (upper + lower) / 2, (upper - lower) / 2
    magnitude = torch.maximum(lower.abs(), upper.abs())  # |c| + r: the largest |a| in the box
    zero = torch.zeros_like(layer.bias)
    out_center = layer.core(center)
    out_radius = layer.core(radius, layer.weight.abs(), zero) if bool(radius.any()) else torch.zeros_like(out_center)
    if ball is not None:
        norms = _patch_norms(layer, magnitude, dual_norm(ball.norm), ball.bias)  # (N, P)
        per_input = ball.eps.view(-1, 1) * norms  # (N, P): the same for every output unit
        out_radius = out_radius + (per_input.view(-1, 1, *out_center.shape[2:]) if layer.is_conv else per_input)
    if noise is not None and noise.weight_radius is not None:
        out_radius = out_radius + layer.core(magnitude, noise.weight_radius.to(magnitude.dtype), zero)
    if noise is not None and noise.bias_radius is not None:
        out_radius = out_radius + noise.bias_radius.to(magnitude.dtype).view((-1,) + (1,) * (out_center.dim() - 2))
    return out_center, out_radius


def _patch_norms(layer: Affine, magnitude: torch.Tensor, q: float, bias: bool) -> torch.Tensor:
    """||[patch_p, 1 if bias]||_q of every patch p of a padded input: (N, P) (P = 1 for a Linear)."""
    patches = layer.patches(magnitude)  # (N, K, P)
    if bias:
        patches = torch.cat([patches, patches.new_ones(patches.shape[0], 1, patches.shape[2])], dim=1)
    return patches.amax(1) if math.isinf(q) else torch.linalg.vector_norm(patches, ord=q, dim=1)


def margin_step(
    k: int,
    layer: Affine,
    lower: torch.Tensor,
    upper: torch.Tensor,
    labels: torch.Tensor,
    balls: Mapping[int, LayerBall],
    noise: Mapping[int, AffineNoise],
) -> torch.Tensor:
    """Lower bounds (N, classes) of f_c - f_j (c = label) through the last Linear layer, rows c and j
    moving independently; +inf in column c."""
    lower, upper = _noisy(lower, upper, noise.get(k))
    center, radius = (upper + lower) / 2, (upper - lower) / 2
    magnitude = torch.maximum(lower.abs(), upper.abs())  # (N, I)
    rows = layer.weight[labels].unsqueeze(1) - layer.weight  # (N, J, I): W_c - W_j
    bounds = (rows @ center.unsqueeze(-1)).squeeze(-1) + layer.bias[labels].unsqueeze(1) - layer.bias  # (N, J)
    bounds = bounds - (rows.abs() @ radius.unsqueeze(-1)).squeeze(-1)
    ball, box = balls.get(k), noise.get(k)
    if ball is not None:
        norms = _patch_norms(layer, magnitude, dual_norm(ball.norm), ball.bias)[:, 0]  # (N,)
        bounds = bounds - 2 * (ball.eps * norms).unsqueeze(1)  # rows c and j each move by eps
    if box is not None and box.weight_radius is not None:
        per_row = magnitude @ box.weight_radius.to(magnitude.dtype).t()  # (N, J): R_j . m
        bounds = bounds - per_row - per_row.gather(1, labels.view(-1, 1))
    if box is not None and box.bias_radius is not None:
        radius_b = box.bias_radius.to(bounds.dtype)
        bounds = bounds - radius_b - radius_b[labels].unsqueeze(1)
    return bounds.scatter(1, labels.view(-1, 1), math.inf)
