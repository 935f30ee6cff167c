"""Linear (CROWN-style) bounds of a ReLU network whose weights move in one layer.

Weng et al., "Towards Certificated Model Robustness Against Weight Perturbations" (AAAI 2020),
Theorem 0.1 and eqs. 10-13. The value a layer N reads, Phi, is exact (nothing before N moves), so its
pre-activations z = W_hat Phi + b_hat range over W Phi + b +- eps ||[Phi, 1 if bias]||_q. Every later
ReLU is relaxed between two lines from its pre-activation bounds [l, u] (Zhang et al., "Efficient
Neural Network Robustness Certification with General Activation Functions", NeurIPS 2018):
relu(z) <= u (z - l) / (u - l) above, relu(z) >= alpha z below with alpha = 1 if u > -l else 0.
Back-substituting these lines from a target (a neuron, or the margin f_c - f_j) down to layer N gives
a function Lambda z_N + const below it that is linear in W_hat (eqs. 10-11); its minimum over the
l_p ball of each output unit's weights is Hoelder's (eqs. 12-13):
Lambda (W Phi + b) + const - eps sum_o ||G_o||_q with G_o = sum_p Lambda_{o,p} [patch_p, 1].
Intermediate bounds come layer by layer the same way; a neuron whose one-step interval bound already
shows it stable is not back-substituted (its relaxation is exact whatever its bounds).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from qrobust.bounds.interval import margin_step
from qrobust.bounds.network import Affine, Flatten, ReLU, ReluNetwork
from qrobust.bounds.perturbation import dual_norm

Box = tuple[torch.Tensor, torch.Tensor]


class SingleLayerBound:
    """Margin lower bounds of ``network`` on ``images`` when only layer ``layer``'s weights move.

    Everything that does not depend on eps (the exact input of the layer, its patches) is computed
    once, so ``margins`` can be called many times in a bisection. Requires every op after the layer
    to be ReLU, Flatten or Linear, with one ReLU between consecutive layers (else ValueError: use
    interval bounds).

    Args:
        network: the chain (its dtype is used throughout).
        images: [0, 1] floats (N, C, H, W) in the network's dtype.
        layer: the perturbed layer k.
        norm: p >= 1 of the l_p ball of each output unit's weights.
        bias: whether each unit's bias joins its weights in the ball.
    """

    def __init__(self, network: ReluNetwork, images: torch.Tensor, layer: int, norm: float, bias: bool) -> None:
        network.check_layer(layer)
        self.network = network
        self.after = _following_linear_layers(network, layer)
        first = network.layers[layer]
        with torch.no_grad():
            padded = first.pad(network.layer_input(images, layer))
            center = first.core(padded)  # (N, O) or (N, O, OH, OW)
            patches = first.patches(padded)  # (N, K, P)
        if bias:
            patches = torch.cat([patches, patches.new_ones(patches.shape[0], 1, patches.shape[2])], dim=1)
        self.q = dual_norm(norm)
        self.out_channels = first.weight.shape[0]
        self.z_center = center.flatten(1)  # (N, n0), channel-major like Flatten
        self.patches = patches
        self.patch_norms = patches.abs().amax(1) if math.isinf(self.q) else torch.linalg.vector_norm(patches, ord=self.q, dim=1)  # (N, P)

    @torch.no_grad()
    def margins(self, eps: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Lower bounds (N, classes) of f_label - f_j for weight radius ``eps`` (N,) per input; +inf at the label."""
        last = self.network.layers[-1]
        bounds = [self._first_bounds(eps)]
        for h in range(1, len(self.after)):
            bounds.append(self._hidden_bounds(h, bounds, eps))
        if not self.after:  # the logits are layer N's output z_0: Hoelder's bound is exact
            spec = torch.eye(last.weight.shape[0], dtype=eps.dtype)
            rows = spec[labels].unsqueeze(1) - spec  # (N, J, J): e_c - e_j
            lower = self._hoelder(rows, torch.zeros(rows.shape[:2], dtype=eps.dtype), eps)
        else:
            rows = last.weight[labels].unsqueeze(1) - last.weight  # (N, J, n): W_c - W_j
            const = last.bias[labels].unsqueeze(1) - last.bias  # (N, J)
            lower = self._lower(rows, const, len(self.after) - 1, bounds, eps)
            l, u = bounds[-1]
            lower = torch.maximum(lower, margin_step(0, last, F.relu(l), F.relu(u), labels, {}, {}))
        return lower.scatter(1, labels.view(-1, 1), math.inf)

    def _first_bounds(self, eps: torch.Tensor) -> Box:
        """Exact pre-activation box of the perturbed layer: centre +- eps ||[patch, 1]||_q."""
        n, p = self.patch_norms.shape
        radius = (eps.view(-1, 1) * self.patch_norms).unsqueeze(1).expand(n, self.out_channels, p).reshape(n, -1)
        return self.z_center - radius, self.z_center + radius

    def _hidden_bounds(self, h: int, bounds: list[Box], eps: torch.Tensor) -> Box:
        """Pre-activation box of the h-th layer after the perturbed one: one interval step, refined by
        back-substitution for the neurons it leaves unstable."""
        layer = self.after[h - 1]
        low_prev, up_prev = (F.relu(t) for t in bounds[h - 1])
        center = layer((low_prev + up_prev) / 2)
        radius = layer((up_prev - low_prev) / 2, layer.weight.abs(), torch.zeros_like(layer.bias))
        lower, upper = center - radius, center + radius  # (N, n)
        unstable = (lower < 0) & (upper > 0)
        counts = unstable.sum(1)
        width = int(counts.max())
        if width == 0:
            return lower, upper
        index = torch.argsort((~unstable).to(torch.int8), dim=1, stable=True)[:, :width]  # (N, U) unstable first
        valid = torch.arange(width, device=index.device) < counts.unsqueeze(1)
        rows, offsets = layer.weight[index], layer.bias[index]  # (N, U, n_prev), (N, U)
        found = self._lower(torch.cat([rows, -rows], 1), torch.cat([offsets, -offsets], 1), h - 1, bounds, eps)
        old_lower, old_upper = lower.gather(1, index), upper.gather(1, index)
        new_lower = torch.where(valid, torch.maximum(old_lower, found[:, :width]), old_lower)
        new_upper = torch.where(valid, torch.minimum(old_upper, -found[:, width:]), old_upper)
        return lower.scatter(1, index, new_lower), upper.scatter(1, index, new_upper)

    def _lower(self, coefficients: torch.Tensor, const: torch.Tensor, h: int, bounds: list[Box], eps: torch.Tensor) -> torch.Tensor:
        """Lower bound (N, R) of coefficients . relu(z_h) + const (coefficients (N, R, n_h)) by back-substitution."""
        while True:
            slope_up, offset_up, slope_low = _relaxation(*bounds[h])  # each (N, n_h)
            positive, negative = coefficients.clamp(min=0), coefficients.clamp(max=0)
            const = const + (negative * offset_up.unsqueeze(1)).sum(-1)
            coefficients = positive * slope_low.unsqueeze(1) + negative * slope_up.unsqueeze(1)  # on z_h
            if h == 0:
                return self._hoelder(coefficients, const, eps)
            layer = self.after[h - 1]  # z_h = W relu(z_{h-1}) + b
            const = const + coefficients @ layer.bias
            coefficients = coefficients @ layer.weight
            h -= 1

    def _hoelder(self, coefficients: torch.Tensor, const: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """min of coefficients . z_0 + const over the weight ball (eqs. 12-13). coefficients (N, R, n0)."""
        value = const + (coefficients * self.z_center.unsqueeze(1)).sum(-1)  # (N, R)
        n, r, _ = coefficients.shape
        positions = self.patches.shape[2]
        if positions == 1:  # Linear: ||G_o||_q = |Lambda_o| ||[Phi, 1]||_q
            dual = coefficients.abs().sum(-1) * self.patch_norms  # (N, R)
        else:
            grads = torch.einsum("nrop,nkp->nrok", coefficients.view(n, r, self.out_channels, positions), self.patches)
            dual = (grads.abs().amax(-1) if math.isinf(self.q) else torch.linalg.vector_norm(grads, ord=self.q, dim=-1)).sum(-1)
        return value - eps.view(-1, 1) * dual


def _relaxation(lower: torch.Tensor, upper: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ReLU between two lines on [lower, upper]: (upper slope, upper offset, lower slope), each like ``lower``."""
    unstable = (lower < 0) & (upper > 0)
    active = (lower >= 0).to(lower.dtype)
    slope_up = torch.where(unstable, upper / (upper - lower).clamp_min(torch.finfo(lower.dtype).tiny), active)
    offset_up = torch.where(unstable, -slope_up * lower, torch.zeros_like(lower))
    slope_low = torch.where(unstable, (upper > -lower).to(lower.dtype), active)
    return slope_up, offset_up, slope_low


def _following_linear_layers(network: ReluNetwork, layer: int) -> list[Affine]:
    """The Linear layers after ``layer`` (the last gives the logits), checking that only ReLU (one between layers) and Flatten follow it."""
    following: list[Affine] = []
    relu_seen = False
    for op in network.ops[network.positions[layer] + 1 :]:
        if isinstance(op, ReLU) and not relu_seen:
            relu_seen = True
        elif isinstance(op, Affine) and not op.is_conv and relu_seen:
            following.append(op)
            relu_seen = False
        elif not isinstance(op, Flatten):
            raise ValueError(
                f"linear bounds for layer {layer} need only ReLU, Flatten and Linear layers after it, with one ReLU "
                f"between layers; found {op!r}: use method='interval'"
            )
    return following
