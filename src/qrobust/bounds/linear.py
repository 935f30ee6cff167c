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
Intermediate bounds come layer by layer the same way. Only the neurons that one interval step leaves
unstable are back-substituted (a stable neuron's relaxation is exact whatever its bounds), and each
stops as soon as the bound reached at some layer, concretised on that layer's box, shows it stable;
all rows of all inputs go through each layer as one matrix product. In a search over eps, the boxes
found at an eps that is not certified are kept: they hold for every smaller eps too (the weight balls
are nested), so later calls below it start from them and back-substitute far fewer neurons.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from qrobust.bounds.interval import margin_step
from qrobust.bounds.network import Affine, Flatten, ReLU, ReluNetwork
from qrobust.bounds.perturbation import dual_norm

Box = tuple[torch.Tensor, torch.Tensor]


class SingleLayerBound:
    """Margin lower bounds of ``network`` on ``images`` when only layer ``layer``'s weights move.

    Everything that does not depend on eps (the exact input of the layer, its patches) is computed
    once, so ``margins`` can be called many times in a search over eps (see the module docstring for
    what is reused between calls). Requires every op after the layer to be ReLU, Flatten or Linear,
    with one ReLU between consecutive layers (else ValueError: use interval bounds).

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
        # boxes of the hidden layers valid for every eps <= known_eps (per input), from calls not certified
        self.known_eps = torch.full((len(images),), math.inf, dtype=self.z_center.dtype)
        self.known = [_unbounded(len(images), layer.weight.shape[0], self.z_center.dtype) for layer in self.after[:-1]]

    @torch.no_grad()
    def margins(self, eps: torch.Tensor, labels: torch.Tensor, inputs: torch.Tensor | None = None) -> torch.Tensor:
        """Lower bounds (M, classes) of f_label - f_j for weight radius ``eps`` (M,) per input; +inf at the label.

        ``inputs`` (M,) indexes the images bounded (default: all of them, M = N); ``labels`` are theirs.
        """
        inputs = torch.arange(len(self.z_center)) if inputs is None else inputs
        batch = _Batch(eps, self.z_center[inputs], self.patches[inputs], self.patch_norms[inputs])
        last = self.network.layers[-1]
        bounds, tables = self._intermediate_bounds(batch, inputs)
        if not self.after:  # the logits are layer N's output z_0: Hoelder's bound is exact
            spec = torch.eye(last.weight.shape[0], dtype=eps.dtype)
            rows = spec[labels].unsqueeze(1) - spec  # (M, J, J): e_c - e_j
            lower = self._hoelder(batch, torch.arange(len(inputs)), rows, eps.new_zeros(rows.shape[:2]))
        else:
            rows = last.weight[labels].unsqueeze(1) - last.weight  # (M, J, n): W_c - W_j
            const = last.bias[labels].unsqueeze(1) - last.bias  # (M, J)
            owner = torch.arange(len(inputs)).repeat_interleave(rows.shape[1])  # (M J,)
            lower = self._back_substitute(batch, owner, rows.flatten(0, 1), const.flatten(), len(self.after) - 1, tables)
            l, u = bounds[-1]
            lower = torch.maximum(lower.view(rows.shape[:2]), margin_step(0, last, F.relu(l), F.relu(u), labels, {}, {}))
        lower = lower.scatter(1, labels.view(-1, 1), math.inf)
        self._remember(inputs, eps, lower.amin(1) <= 0, bounds)
        return lower

    def _first_bounds(self, batch: _Batch) -> Box:
        """Exact pre-activation box of the perturbed layer: centre +- eps ||[patch, 1]||_q, (M, n0)."""
        radius = batch.eps.view(-1, 1, 1) * batch.patch_norms.unsqueeze(1)  # (M, 1, P): the same for every output channel
        radius = radius.expand(-1, self.out_channels, -1).reshape(batch.z_center.shape)
        return batch.z_center - radius, batch.z_center + radius

    def _intermediate_bounds(self, batch: _Batch, inputs: torch.Tensor) -> tuple[list[Box], list[torch.Tensor]]:
        """Pre-activation boxes (M, n_h) of z_0 (exact) and of every hidden layer after it, layer by layer:
        one interval step, intersected with the known boxes where they hold, then back-substitution of
        the neurons still unstable. Also their ``_table``s."""
        bounds = [self._first_bounds(batch)]
        tables = [_table(*bounds[0])]
        valid = (batch.eps <= self.known_eps[inputs]).unsqueeze(1)  # (M, 1)
        for h in range(1, len(self.after)):
            lower, upper = _interval_step(self.after[h - 1], *bounds[-1])  # (M, n_h)
            known_lower, known_upper = (t[inputs] for t in self.known[h - 1])
            lower = torch.where(valid, torch.maximum(lower, known_lower), lower)
            upper = torch.where(valid, torch.minimum(upper, known_upper), upper)
            bounds.append(self._refine(batch, h, lower, upper, tables))
            tables.append(_table(*bounds[-1]))
        return bounds, tables

    def _refine(self, batch: _Batch, h: int, lower: torch.Tensor, upper: torch.Tensor, tables: list[torch.Tensor]) -> Box:
        """The box (M, n_h) of z_h with its unstable neurons' bounds tightened by back-substitution."""
        owner, neuron = torch.nonzero((lower < 0) & (upper > 0), as_tuple=True)  # (U,) each
        if len(owner) == 0:
            return lower, upper
        layer = self.after[h - 1]
        rows, offsets = layer.weight[neuron], layer.bias[neuron]  # (U, n_prev), (U,)
        # rows for l (of z) and for -u (of -z), one pair per unstable neuron
        found = self._back_substitute(
            batch, owner.repeat(2), torch.cat([rows, -rows]), torch.cat([offsets, -offsets]), h - 1, tables, pairs=len(owner)
        )
        lower, upper = lower.clone(), upper.clone()
        lower[owner, neuron] = torch.maximum(lower[owner, neuron], found[: len(owner)])
        upper[owner, neuron] = torch.minimum(upper[owner, neuron], -found[len(owner) :])
        return lower, upper

    def _back_substitute(
        self,
        batch: _Batch,
        owner: torch.Tensor,
        coefficients: torch.Tensor,
        const: torch.Tensor,
        h: int,
        tables: list[torch.Tensor],
        pairs: int | None = None,
    ) -> torch.Tensor:
        """Lower bounds (R,) of coefficients . relu(z_h) + const, row r of input ``owner[r]`` (coefficients
        (R, n_h)); ``tables[g]`` (M, 5, n_g) describes the box of z_g (``_table``).

        With ``pairs`` = P, rows r and r + P bound one neuron (its l and -u): they go down only until
        either is > 0 (the neuron is stable), concretised on each layer's box on the way, and the best
        bound met is returned (every one is sound). Rows are processed in blocks of one input's rows
        (``_Blocks``), so that each layer's relaxation is broadcast rather than copied to every row.
        """
        total = len(const)
        best = torch.full((total + 1,), -math.inf, dtype=const.dtype)  # the last entry collects padding
        blocks = _Blocks(owner, len(batch.eps))
        coefficients, const, ids = blocks.spread(coefficients, 0.0), blocks.spread(const, 0.0), blocks.spread(torch.arange(total), total)
        while True:
            table = tables[h][blocks.owner]  # (V, 5, n_h)
            negative = coefficients.clamp(max=0)  # (V, C, n_h)
            const = const + (negative @ table[:, 2].unsqueeze(-1)).squeeze(-1)  # (V, C)
            coefficients = torch.addcmul(coefficients * table[:, None, 0], negative, table[:, None, 1])  # on z_h
            if h == 0:
                value = self._hoelder(batch, blocks.owner, coefficients, const)
                best[ids] = torch.maximum(best[ids], value)
                return best[:total]
            if pairs is not None:  # concretise on the box of z_h, and stop the neurons shown stable
                value = const + (coefficients @ table[:, 3].unsqueeze(-1) - coefficients.abs() @ table[:, 4].unsqueeze(-1)).squeeze(-1)
                best[ids] = torch.maximum(best[ids], value)
                stable = torch.cat([(best[:pairs] > 0) | (best[pairs:total] > 0), torch.ones(1, dtype=torch.bool)])  # (P + 1,)
                going = ~stable[torch.where(ids < total, ids % pairs, pairs)]  # (V, C)
                count = int(going.sum())
                if count == 0:
                    return best[:total]
                if count <= 0.75 * ids.numel():  # regroup the rows still going into fewer blocks
                    block, slot = torch.nonzero(going, as_tuple=True)
                    blocks = _Blocks(blocks.owner[block], len(batch.eps))
                    coefficients, const = blocks.spread(coefficients[block, slot], 0.0), blocks.spread(const[block, slot], 0.0)
                    ids = blocks.spread(ids[block, slot], total)
            layer = self.after[h - 1]  # z_h = W relu(z_{h-1}) + b
            const = const + coefficients @ layer.bias
            coefficients = coefficients @ layer.weight
            h -= 1

    def _hoelder(self, batch: _Batch, owner: torch.Tensor, coefficients: torch.Tensor, const: torch.Tensor) -> torch.Tensor:
        """min of coefficients . z_0 + const over the weight ball (eqs. 12-13): (V, C) for coefficients
        (V, C, n0), block v holding rows of input ``owner[v]``."""
        value = const + (coefficients @ batch.z_center[owner].unsqueeze(-1)).squeeze(-1)  # (V, C)
        v, c, _ = coefficients.shape
        positions = batch.patches.shape[2]
        if positions == 1:  # Linear: ||G_o||_q = |Lambda_o| ||[Phi, 1]||_q
            dual = coefficients.abs().sum(-1) * batch.patch_norms[owner]  # (V, C)
        else:
            grads = torch.einsum("vcop,vkp->vcok", coefficients.reshape(v, c, self.out_channels, positions), batch.patches[owner])
            dual = (grads.abs().amax(-1) if math.isinf(self.q) else torch.linalg.vector_norm(grads, ord=self.q, dim=-1)).sum(-1)
        return value - batch.eps[owner].view(-1, 1) * dual

    def _remember(self, inputs: torch.Tensor, eps: torch.Tensor, failed: torch.Tensor, bounds: list[Box]) -> None:
        """Keep the boxes of the inputs not certified at an eps below their known one (they hold below it)."""
        newer = failed & (eps < self.known_eps[inputs])
        chosen = inputs[newer]
        self.known_eps[chosen] = eps[newer]
        for (lower, upper), (known_lower, known_upper) in zip(bounds[1:], self.known):
            known_lower[chosen], known_upper[chosen] = lower[newer], upper[newer]


@dataclass(frozen=True)
class _Batch:
    """The inputs of one ``margins`` call: eps (M,), z_center (M, n0), patches (M, K, P), patch_norms (M, P)."""

    eps: torch.Tensor
    z_center: torch.Tensor
    patches: torch.Tensor
    patch_norms: torch.Tensor


class _Blocks:
    """Rows of several inputs grouped in blocks of ``SIZE`` rows of one input each (the last one padded).

    ``owner`` (R,) is the input of each row, ``inputs`` their number; ``self.owner`` (V,) is each
    block's input and ``spread`` puts per-row values into (V, SIZE, ...).
    """

    SIZE = 32

    def __init__(self, owner: torch.Tensor, inputs: int) -> None:
        self.order = torch.argsort(owner, stable=True)
        counts = torch.bincount(owner, minlength=inputs)  # (M,)
        per_input = (counts + self.SIZE - 1) // self.SIZE
        sorted_owner = owner[self.order]
        rank = torch.arange(len(owner)) - (torch.cumsum(counts, 0) - counts)[sorted_owner]  # place among its input's rows
        self.block = (torch.cumsum(per_input, 0) - per_input)[sorted_owner] + torch.div(rank, self.SIZE, rounding_mode="floor")
        self.slot = rank % self.SIZE
        self.owner = torch.repeat_interleave(torch.arange(inputs), per_input)  # (V,)

    def spread(self, values: torch.Tensor, fill: float) -> torch.Tensor:
        """(V, SIZE, ...) of per-row ``values`` (R, ...), ``fill`` in the padding."""
        out = values.new_full((len(self.owner), self.SIZE, *values.shape[1:]), fill)
        out[self.block, self.slot] = values[self.order]
        return out


def _unbounded(n: int, width: int, dtype: torch.dtype) -> Box:
    """The box (-inf, inf) of shape (n, width)."""
    return torch.full((n, width), -math.inf, dtype=dtype), torch.full((n, width), math.inf, dtype=dtype)


def _interval_step(layer: Affine, lower: torch.Tensor, upper: torch.Tensor) -> Box:
    """One interval step: the box of W relu(z) + b over the pre-activation box [lower, upper]."""
    low, up = F.relu(lower), F.relu(upper)
    center = layer((low + up) / 2)
    radius = layer((up - low) / 2, layer.weight.abs(), torch.zeros_like(layer.bias))
    return center - radius, center + radius


def _table(lower: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
    """The ReLU relaxation on the box [lower, upper] (M, n) and the box itself, as (M, 5, n): lower slope,
    upper slope - lower slope, upper offset, centre, radius (relu(z) between the two lines on the box)."""
    unstable = (lower < 0) & (upper > 0)
    active = (lower >= 0).to(lower.dtype)
    slope_up = torch.where(unstable, upper / (upper - lower).clamp_min(torch.finfo(lower.dtype).tiny), active)
    offset_up = torch.where(unstable, -slope_up * lower, torch.zeros_like(lower))
    slope_low = torch.where(unstable, (upper > -lower).to(lower.dtype), active)
    return torch.stack([slope_low, slope_up - slope_low, offset_up, (upper + lower) / 2, (upper - lower) / 2], 1)


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
