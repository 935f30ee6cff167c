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
Intermediate bounds come layer by layer the same way.

What makes it fast, without loosening anything:

* Only the neurons that one interval step leaves unstable are back-substituted (a stable neuron's
  relaxation is exact whatever its bounds). Interval steps lose the correlations between neurons and
  leave almost every neuron of a deep layer unstable, so once they leave an eighth unstable, a
  zonotope carried forward (``_Zonotope``: one product per layer for all neurons) tightens the boxes
  first; it leaves about as few unstable as back-substitution would. Each back-substituted neuron
  stops as soon as the bound reached at some layer,
  concretised on the box of that layer's ReLU outputs, shows it stable. Every bound met on the way is
  sound, and the best is kept; concretising relu(z) on [relu(l), relu(u)] is never looser than
  concretising the relaxation lines on [l, u].
* A neuron whose upper bound is <= 0 outputs exactly 0 on its box, so it drops out of every product:
  per input, the rows and the weights are restricted to the live neurons (upper bound > 0), about half
  of each layer, and each step is one batched matrix product over them (per-input weights with the
  lower slopes folded in) plus a small one over the few unstable neurons (the upper lines).
* Rows are back-substituted a few inputs at a time, so that the working set stays small.
* In a search over eps, the boxes found at an eps that is not certified are kept: they hold for every
  smaller eps too (the weight balls are nested), so later calls below it start from them (without a
  zonotope) and back-substitute far fewer neurons.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from qrobust.bounds.network import Affine, Flatten, ReLU, ReluNetwork
from qrobust.bounds.perturbation import dual_norm

Box = tuple[torch.Tensor, torch.Tensor]
CHUNK = 1 << 19  # coefficients (numbers) back-substituted at once: 4 MB in float64, so steps run in cache


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
        self.after = following_linear_layers(network, layer)
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
        self.patch_norms = (
            patches.abs().amax(1) if math.isinf(self.q) else torch.linalg.vector_norm(patches, ord=self.q, dim=1)
        )  # (N, P)
        # the following layers with a zero row and column appended, for the padding of live-neuron indices
        self.weights = [F.pad(layer.weight, (0, 1, 0, 1)) for layer in self.after]  # (n_h + 1, n_{h-1} + 1)
        self.biases = [F.pad(layer.bias, (0, 1)) for layer in self.after]  # (n_h + 1,)
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
        if (
            not self.after
        ):  # the logits are layer N's output z_0: Hoelder's bound is exact, rows c and j move by eps each
            z = batch.z_center
            lower = z.gather(1, labels.view(-1, 1)) - z - 2 * (eps * batch.patch_norms[:, 0]).unsqueeze(1)
            return lower.scatter(1, labels.view(-1, 1), math.inf)
        levels = self._levels(batch, inputs)
        top, weight, bias = levels[-1], self.weights[-1], self.after[-1].bias
        rows = weight[labels].unsqueeze(1) - weight[:-1]  # (M, J, n_L + 1): W_c - W_j on relu(z_L)
        rows = rows.gather(2, top.live.unsqueeze(1).expand(-1, rows.shape[1], -1))  # (M, J, A_L)
        const = bias[labels].unsqueeze(1) - bias  # (M, J)
        everyone = torch.arange(len(inputs))
        lower = torch.cat(
            [
                self._back_substitute(batch, levels, _Owner(everyone[part]), rows[part], const[part])[0]
                for part in _chunks(len(inputs), rows.shape[1] * rows.shape[2])
            ]
        )
        lower = lower.scatter(1, labels.view(-1, 1), math.inf)
        self._remember(inputs, eps, lower.amin(1) <= 0, levels)
        return lower

    @torch.no_grad()
    def descent(self, labels: torch.Tensor, inputs: torch.Tensor | None = None) -> torch.Tensor:
        """D (M, classes) with ``margins`` = exact margins - eps D for every eps small enough that no neuron
        turns unstable (0 at the label): there every relaxation is exact, so the back-substituted rows are
        the margins' gradients with respect to z_0 at the centre, and D is their dual norm (eqs. 12-13).
        One backward pass with the shared weights: a search for the radius starts from the root of this line."""
        inputs = torch.arange(len(self.z_center)) if inputs is None else inputs
        z = self.z_center[inputs]
        if not self.after:  # rows c and j move by eps each
            return (2 * self.patch_norms[inputs, :1]).expand(-1, z.shape[1]).scatter(1, labels.view(-1, 1), 0.0)
        active = []  # z_g > 0 at the centre, g = 0 .. L - 1
        for layer in self.after:
            active.append(z > 0)
            z = layer(F.relu(z))
        rows = self.after[-1].weight[labels].unsqueeze(1) - self.after[-1].weight  # (M, J, n_L) on relu(z_{L-1})
        for layer, mask in zip(self.after[-2::-1], active[:0:-1]):
            rows = (rows * mask.unsqueeze(1)) @ layer.weight  # through relu(z_g) and z_g = W relu(z_{g-1}) + b
        return self._dual(rows * active[0].unsqueeze(1), self.patches[inputs], self.patch_norms[inputs])

    def _first_bounds(self, batch: _Batch) -> Box:
        """Exact pre-activation box of the perturbed layer: centre +- eps ||[patch, 1]||_q, (M, n0)."""
        radius = batch.eps.view(-1, 1, 1) * batch.patch_norms.unsqueeze(
            1
        )  # (M, 1, P): the same for every output channel
        radius = radius.expand(-1, self.out_channels, -1).reshape(batch.z_center.shape)
        return batch.z_center - radius, batch.z_center + radius

    def _levels(self, batch: _Batch, inputs: torch.Tensor) -> list[_Level]:
        """The boxes (M, n_h) of z_0 (exact) and of every hidden layer after it, with their relaxations, layer
        by layer: one interval step, intersected with the known boxes where they hold, or else with a zonotope's
        once the interval steps leave many neurons unstable, then back-substitution of the neurons still unstable."""
        levels = [_Level(*self._first_bounds(batch))]
        valid = (batch.eps <= self.known_eps[inputs]).unsqueeze(1)  # (M, 1)
        fresh = torch.nonzero(~valid.flatten() | torch.isinf(self.known_eps[inputs])).flatten()  # (F,) no boxes known
        zonotope = None
        for h in range(1, len(self.after)):
            lower, upper = _interval_step(self.after[h - 1], levels[-1].lower, levels[-1].upper)  # (M, n_h)
            if zonotope is None and h >= 2 and _zonotope_pays(lower[fresh], upper[fresh], levels[h - 2].lower.shape[1]):
                zonotope = _Zonotope(
                    self.after[h - 2], levels[h - 2].lower[fresh], levels[h - 2].upper[fresh]
                )  # of z_{h-1}
            if zonotope is not None:
                zonotope.step(self.after[h - 1], levels[h - 1].lower[fresh], levels[h - 1].upper[fresh])
                zonotope_lower, zonotope_upper = zonotope.bounds()
                lower[fresh], upper[fresh] = (
                    torch.maximum(lower[fresh], zonotope_lower),
                    torch.minimum(upper[fresh], zonotope_upper),
                )
            known_lower, known_upper = (t[inputs] for t in self.known[h - 1])
            lower = torch.where(valid, torch.maximum(lower, known_lower), lower)
            upper = torch.where(valid, torch.minimum(upper, known_upper), upper)
            levels.append(
                _Level(*self._refine(batch, levels, lower, upper), levels[-1], self.weights[h - 1], self.biases[h - 1])
            )
        return levels

    def _refine(self, batch: _Batch, levels: list[_Level], lower: torch.Tensor, upper: torch.Tensor) -> Box:
        """The box (M, n_h) of z_h (h = len(levels)) with its unstable neurons' bounds tightened by back-substitution."""
        h, below = len(levels), levels[-1]
        unstable = (lower < 0) & (upper > 0)  # (M, n_h)
        owners = torch.nonzero(unstable.any(1)).flatten()  # (B,)
        if 2 * len(owners) > len(unstable):  # all inputs, as a run (see _Owner), if most have unstable neurons
            owners = torch.arange(len(unstable))
        if len(owners) == 0:
            return lower, upper
        neurons, valid = _positions(unstable[owners], lower.shape[1])  # (B, R) padded with n_h
        lower, upper = F.pad(lower, (0, 1)), F.pad(upper, (0, 1))  # the padding writes to a spare column
        for part in _chunks(len(owners), 2 * neurons.shape[1] * below.live.shape[1]):
            owner, neuron = owners[part], neurons[part]
            rows = _submatrices(self.weights[h - 1], neuron, below.live[owner])  # (B, R, A_{h-1}) on relu(z_{h-1})
            found = self._back_substitute(
                batch, levels, _Owner(owner), rows, self.biases[h - 1][neuron], valid[part]
            )  # (2, B, R)
            at = (owner.unsqueeze(1), neuron)
            lower[at] = torch.maximum(lower[at], found[0])
            upper[at] = torch.minimum(upper[at], -found[1])
        return lower[:, :-1], upper[:, :-1]

    def _back_substitute(
        self,
        batch: _Batch,
        levels: list[_Level],
        owner: _Owner,
        coefficients: torch.Tensor,
        const: torch.Tensor,
        neurons: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Lower bounds of coefficients . relu(z_g) + const (g = len(levels) - 1) for the rows ``coefficients``
        (B, R, A_g) and ``const`` (B, R) of the inputs ``owner`` (B,), in the live coordinates of z_g.

        Every row goes down to z_0 (Hoelder), concretised on the box of each relu(z_g) on the way, and the
        best bound met is returned: (1, B, R). With ``neurons`` (B, R) (False marks padding rows), row r is
        neuron r of z_{g+1} and both its bounds are wanted, (2, B, R): l, and -u from the negated row;
        the two go down together only until either is > 0 (the neuron is stable), and are not concretised
        on the first box (that is the interval step's bound, already known).
        """
        blocks, r = const.shape
        pairs = neurons is not None
        spare = blocks * r  # where the padding rows' bounds go
        best = torch.full((2 if pairs else 1, spare + 1), -math.inf, dtype=const.dtype)  # (S, B R + 1)
        slot = torch.arange(spare).view(blocks, r)  # (B, R): each row's place in best
        g = len(levels) - 1
        if neurons is None:
            coefficients, const = coefficients.unsqueeze(0), const.unsqueeze(0)  # (1, B, R, A_g), (1, B, R)
        elif g == 0:
            slot = torch.where(neurons, slot, spare)
            coefficients, const = (
                torch.stack([coefficients, -coefficients]),
                torch.stack([const, -const]),
            )  # (2, B, R, A_0)
        else:  # through the first layer for l and -u at once: the rows of -u are those of l negated
            slot = torch.where(neurons, slot, spare)
            level = levels[g]
            unstable = coefficients[..., : level.gap.shape[1]]  # (B, R, U_g)
            negative = torch.stack([unstable.clamp(max=0), unstable.neg().clamp_(max=0)])  # (2, B, R, U_g)
            lower_weight, upper_weight = level.weights(owner)
            half = coefficients @ lower_weight  # (B, R, A_{g-1})
            shared = const + _dot(coefficients, owner.pick(level.bias))
            const = torch.stack([shared, -shared]) + _dot(negative, owner.pick(level.upper_bias))  # (2, B, R)
            coefficients = half.new_empty(2, *half.shape)
            torch.baddbmm(half, negative[0], upper_weight, out=coefficients[0])
            torch.baddbmm(half, negative[1], upper_weight, beta=-1, out=coefficients[1])  # (2, B, R, A_{g-1})
            g -= 1
        first = pairs and g == len(levels) - 1
        while True:
            level = levels[g]
            through = None  # c . (slope b): the lower lines' share of the bias through the layer below
            if not first:  # concretise on the box of relu(z_g)
                dots = coefficients @ owner.pick(
                    level.vectors
                )  # (S, B, R, 1 or 2): c . relu(l), and c . (slope b) for g > 0
                value = const + dots[..., 0] + _dot(coefficients.clamp(max=0), owner.pick(level.width))  # (S, B, R)
                through = dots[..., 1] if g > 0 else None
                best[:, slot] = torch.maximum(best[:, slot], value)
                if pairs:
                    stable = torch.cat([(best[:, :-1] > 0).any(0), best.new_ones(1, dtype=torch.bool)])  # (B R + 1,)
                    going = ~stable[slot]  # (B, R)
                    counts = going.sum(1)  # (B,)
                    if not bool(counts.any()):
                        break
                    width = int(counts.max())
                    keep = counts > 0  # the inputs with rows still going; all of them if that is most (see _Owner)
                    if 2 * int(keep.sum()) > len(keep):
                        keep = torch.ones_like(keep)
                    if int(keep.sum()) * width <= 0.75 * going.numel():  # regroup the rows still going
                        order, kept = _positions(going[keep], 0, width)  # (B', R')
                        slot = torch.where(kept, slot[keep].gather(1, order), spare)
                        rows = (torch.nonzero(keep) * going.shape[1] + order).flatten()  # in B R
                        coefficients = coefficients.flatten(1, 2).index_select(1, rows).unflatten(1, slot.shape)
                        const = const.flatten(1).index_select(1, rows).unflatten(1, slot.shape)
                        through = (
                            None
                            if through is None
                            else through.flatten(1).index_select(1, rows).unflatten(1, slot.shape)
                        )
                        owner = _Owner(owner.index[keep])
            first = False
            # the relaxation of relu(z_g): lower line slope * z, and the upper line's extra gap * z + offset where
            # the coefficient is negative, on the unstable neurons only (the first U_g live ones; elsewhere gap = 0)
            negative = coefficients[..., : level.gap.shape[1]].clamp(max=0)  # (S, B, R, U_g)
            if g == 0:  # Lambda on z_0, then Hoelder over the weight ball
                lam = coefficients * owner.pick(level.slope).unsqueeze(1)
                lam[..., : level.gap.shape[1]] += negative * owner.pick(level.gap).unsqueeze(1)  # (S, B, R, A_0)
                value = self._hoelder(batch, level, owner, lam, const + _dot(negative, owner.pick(level.offset)))
                best[:, slot] = torch.maximum(best[:, slot], value)
                break
            # through z_g = W relu(z_{g-1}) + b, on the live neurons of both
            if through is None:
                through = _dot(coefficients, owner.pick(level.bias))
            const = const + through + _dot(negative, owner.pick(level.upper_bias))
            lower_weight, upper_weight = level.weights(owner)  # (B, A_g, A_{g-1}), (B, U_g, A_{g-1})
            product = coefficients.new_empty(*coefficients.shape[:3], lower_weight.shape[2])
            for side in range(len(product)):
                torch.bmm(coefficients[side], lower_weight, out=product[side]).baddbmm_(negative[side], upper_weight)
            coefficients = product  # (S, B, R, A_{g-1})
            g -= 1
        return best[:, :-1].view(len(best), blocks, r)

    def _hoelder(
        self, batch: _Batch, level: _Level, owner: _Owner, coefficients: torch.Tensor, const: torch.Tensor
    ) -> torch.Tensor:
        """min of coefficients . z_0 + const over the weight ball (eqs. 12-13): (S, B, R) for coefficients
        (S, B, R, A_0) on the live neurons of z_0 (``level``), block b holding rows of input ``owner.index[b]``."""
        live = owner.pick(level.live)  # (B, A_0)
        value = const + _dot(coefficients, owner.pick(F.pad(batch.z_center, (0, 1))).gather(1, live))  # (S, B, R)
        if batch.patches.shape[2] > 1:  # back on all of z_0 (O channels x P positions)
            sides, blocks, rows, _ = coefficients.shape
            full = coefficients.new_zeros(sides, blocks, rows, batch.z_center.shape[1] + 1)
            coefficients = full.scatter(3, live[None, :, None, :].expand(sides, -1, rows, -1), coefficients)[
                ..., :-1
            ]  # (S, B, R, O P)
        return value - owner.pick(batch.eps).view(-1, 1) * self._dual(
            coefficients, owner.pick(batch.patches), owner.pick(batch.patch_norms)
        )

    def _dual(self, coefficients: torch.Tensor, patches: torch.Tensor, patch_norms: torch.Tensor) -> torch.Tensor:
        """sum_o ||G_o||_q, G_o = sum_p Lambda_{o,p} [patch_p, 1], for rows Lambda (..., B, R, n) on z_0 of the
        inputs with ``patches`` (B, K, P) and ``patch_norms`` (B, P); for a Linear layer (P = 1) n may be any
        subset of z_0's neurons that holds every non-zero coefficient: ||G_o||_q = |Lambda_o| ||[Phi, 1]||_q."""
        positions = patches.shape[2]
        if positions == 1:
            return coefficients.abs().sum(-1) * patch_norms  # (..., B, R)
        grads = coefficients.unflatten(-1, (self.out_channels, positions)) @ patches.transpose(1, 2).unsqueeze(
            1
        )  # (..., B, R, O, K)
        norms = grads.abs().amax(-1) if math.isinf(self.q) else torch.linalg.vector_norm(grads, ord=self.q, dim=-1)
        return norms.sum(-1)

    def _remember(self, inputs: torch.Tensor, eps: torch.Tensor, failed: torch.Tensor, levels: list[_Level]) -> None:
        """Keep the boxes of the inputs not certified at an eps below their known one (they hold below it)."""
        newer = failed & (eps < self.known_eps[inputs])
        chosen = inputs[newer]
        self.known_eps[chosen] = eps[newer]
        for level, (known_lower, known_upper) in zip(levels[1:], self.known):
            known_lower[chosen], known_upper[chosen] = level.lower[newer], level.upper[newer]


@dataclass(frozen=True)
class _Batch:
    """The inputs of one ``margins`` call: eps (M,), z_center (M, n0), patches (M, K, P), patch_norms (M, P)."""

    eps: torch.Tensor
    z_center: torch.Tensor
    patches: torch.Tensor
    patch_norms: torch.Tensor


class _Level:
    """The box [lower, upper] (M, n) of one pre-activation layer z_g, and its ReLU relaxation and the layer
    into it (z_g = W relu(z_{g-1}) + b) on the live neurons, for back-substitution.

    A neuron is live where upper > 0 (else relu(z) = 0 on the box). ``live`` (M, A) holds each input's
    live neurons, the unstable ones (l < 0 < u) first, padded with n; ``width`` and ``slope`` (M, A) are
    relu(u) - relu(l) and the lower line's slope (0 or 1) there, 0 in the padding; ``vectors`` (M, A, 1
    or 2) are relu(l) and, below a layer, slope * b. ``gap`` and ``offset`` (M, U) are the upper line's
    slope minus the lower one and its offset -u l / (u - l) on the first U live neurons (U the largest
    number of unstable ones), 0 where they are stable; ``upper_bias`` = gap * b + offset. Below a layer,
    ``lower_weights`` (M, A, A_below) and ``upper_weights`` (M, U, A_below) are slope * W and gap * W on the
    live neurons of both levels.
    """

    def __init__(
        self,
        lower: torch.Tensor,
        upper: torch.Tensor,
        below: _Level | None = None,
        weight: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
    ) -> None:
        self.lower, self.upper = lower, upper
        live, unstable = upper > 0, (lower < 0) & (upper > 0)  # (M, n)
        counts = (live.sum(1, keepdim=True), unstable.sum(1, keepdim=True))  # (M, 1) each
        widths = [int(count.max()) if len(lower) else 0 for count in counts]
        order = torch.sort(live.to(torch.uint8) + unstable.to(torch.uint8), dim=1, descending=True, stable=True).indices
        self.live = torch.where(torch.arange(widths[0]) < counts[0], order[:, : widths[0]], lower.shape[1])  # (M, A)
        live_lower, live_upper = (
            F.pad(lower, (0, 1)).gather(1, self.live),
            F.pad(upper, (0, 1)).gather(1, self.live),
        )  # (M, A), 0 in the padding
        unstable = (live_lower < 0)[:, : widths[1]]  # (M, U)
        l_u, u_u = live_lower[:, : widths[1]], live_upper[:, : widths[1]]
        slope_up = u_u / (u_u - l_u).clamp_min(torch.finfo(live_lower.dtype).tiny)
        self.slope = torch.where(
            live_lower < 0, (live_upper > -live_lower).to(live_lower.dtype), (live_upper > 0).to(live_lower.dtype)
        )
        self.gap = torch.where(unstable, slope_up - self.slope[:, : widths[1]], 0.0)
        self.offset = torch.where(unstable, -slope_up * l_u, 0.0)
        low = live_lower.clamp_min(0)
        self.width = live_upper - low
        if below is None or weight is None or bias is None:
            if not (below is None and weight is None and bias is None):
                raise ValueError("a level above the first needs the level below, its weight and its bias")
            self.vectors = low.unsqueeze(-1)  # (M, A, 1)
            return
        live_bias = bias[self.live]  # (M, A)
        self.bias = self.slope * live_bias
        self.vectors = torch.stack([low, self.bias], -1)  # (M, A, 2)
        self.upper_bias = self.gap * live_bias[:, : widths[1]] + self.offset  # (M, U)
        # slope * W and gap * W on the live neurons here and below; the slope is 1 on stable live neurons
        weight = _submatrices(weight, self.live, below.live)  # (M, A, A_below) from the padded W
        self.upper_weights = weight[:, : widths[1]] * self.gap.unsqueeze(-1)  # (M, U, A_below)
        weight[:, : widths[1]] *= self.slope[:, : widths[1]].unsqueeze(-1)
        self.lower_weights = weight

    def weights(self, owner: _Owner) -> tuple[torch.Tensor, torch.Tensor]:
        """slope * W (B, A, A_below) and gap * W on the first U rows (B, U, A_below) of the inputs ``owner``."""
        return owner.pick(self.lower_weights), owner.pick(self.upper_weights)


class _Zonotope:
    """Zonotope bounds of z_1, z_2, ... (Singh et al., "Fast and Effective Robustness Certification",
    NeurIPS 2018): z_g = center + sum_i G_i eps_i over |eps_i| <= 1, propagated forward for all neurons.

    Cheap boxes that keep the correlations an interval step loses: on a 10-layer MLP they leave about
    as many neurons unstable as back-substitution does, where interval steps leave almost all of them,
    so that back-substitution has few neurons left to refine. The outputs of z_0 move independently
    (each unit has its own weights; a conv's positions, which share them, are bounded as if they did
    not), so relu(z_0) is the box [relu(l), relu(u)], one symbol per live neuron. Each later ReLU is
    relaxed on the (refined) box [l, u] of its input: kept where l >= 0, zero where u <= 0, and
    lambda z + mu +- mu with lambda = u / (u - l), mu = -lambda l / 2 where unstable, the +- mu a new
    symbol. The generators are blocks (n_g, M, S_i), one per layer's new symbols (no copying to join
    them), each taken through a layer by one product with its shared weights.

    The generators are stored in ``ZONOTOPE_DTYPE`` (float32: half the memory traffic, products about
    twice as fast) while centres and boxes stay in the network's dtype. When that is coarser than the
    network's, ``error`` (n_g, M) bounds, per neuron, the sum over symbols of how far rounding may have
    moved the stored generators from the exact ones, and widens the boxes by it (see ``step``).
    """

    def __init__(self, layer: Affine, lower: torch.Tensor, upper: torch.Tensor) -> None:
        """The zonotope of layer(relu(z)) for the box [lower, upper] (M, n) of z, one symbol per live neuron
        (exact for z_0; below, a start that forgets how the neurons of z move together)."""
        low, high = F.relu(lower), F.relu(upper)
        self.center = layer((low + high) / 2)  # (M, n_1)
        block = _columns(layer.weight, upper > 0, (high - low) / 2)  # (n_1, M, A)
        self.rounding = ZONOTOPE_DTYPE != lower.dtype and torch.finfo(ZONOTOPE_DTYPE).eps > torch.finfo(lower.dtype).eps
        self.generators = [block.to(ZONOTOPE_DTYPE)]
        self.error = _stored_error(block, self.rounding)
        self.rows = _row_sums(self.generators, lower.dtype)  # (n_1, M): sum_i |G_i| per neuron

    def bounds(self) -> Box:
        reach = (self.rows + self.error).t()  # (M, n_g)
        return self.center - reach, self.center + reach

    def step(self, layer: Affine, lower: torch.Tensor, upper: torch.Tensor) -> None:
        """Through relu and ``layer``, given the box [lower, upper] (M, n_g) of z_g, which the zonotope contains.

        Rounding: with stored generators G and exact ones G + D (sum_i |D_i| <= error per neuron), the new
        exact generators W (s G + s D) differ from the stored product fl(fl(W) fl(fl(s) G)) by at most
        kappa |W| s |G| + |W| s |D| entry-wise summed, kappa = (n_g + 4) u for unit roundoff u (the
        rounding of W, of s, of s G, and the n_g-term sums of the product; Higham, "Accuracy and
        Stability of Numerical Algorithms", 2002, ch. 3), so error' = |W| (s (kappa rows + error)).
        """
        active, unstable = lower >= 0, (lower < 0) & (upper > 0)
        slope = upper / (upper - lower).clamp_min(torch.finfo(lower.dtype).tiny)
        scale = torch.where(active, 1.0, torch.where(unstable, slope, 0.0)).t()  # (n_g, M)
        mu = torch.where(unstable, -slope * lower / 2, 0.0)  # (M, n_g)
        weight, compact = layer.weight, layer.weight.to(ZONOTOPE_DTYPE)
        stored_scale = scale.unsqueeze(-1).to(ZONOTOPE_DTYPE)
        blocks = [
            (compact @ (block * stored_scale).flatten(1)).view(weight.shape[0], *block.shape[1:])
            for block in self.generators
        ]
        fresh = _columns(weight, unstable, mu)  # (n_{g+1}, M, U)
        finfo = torch.finfo(ZONOTOPE_DTYPE)
        kappa = (weight.shape[1] + 4) * finfo.eps / 2 * (1 + 1e-3) if self.rounding else 0.0  # 1e-3: second-order terms
        underflow = (
            weight.shape[1] * sum(block.shape[2] for block in blocks) * finfo.smallest_normal if self.rounding else 0.0
        )
        self.error = (
            weight.abs() @ (scale * (kappa * self.rows + self.error)) + underflow + _stored_error(fresh, self.rounding)
        )
        self.generators = [*blocks, fresh.to(ZONOTOPE_DTYPE)]
        self.rows = _row_sums(self.generators, lower.dtype)
        self.center = layer(self.center * scale.t() + mu)


ZONOTOPE_DTYPE = torch.float32  # of the generators (see _Zonotope)


def _row_sums(blocks: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """An upper bound in ``dtype`` of sum_i |G_i| per neuron and input (n, M): each block's sum in its own
    dtype, raised by the most a sum of S non-negative terms can lose to rounding, (S - 1) u (Higham, ch. 4)."""
    total = torch.zeros((), dtype=dtype)
    for block in blocks:
        finfo = torch.finfo(block.dtype)
        total = total + block.abs().sum(-1).to(dtype) * (1 + block.shape[-1] * finfo.eps / 2 * (1 + 1e-3))
    return total


def _stored_error(block: torch.Tensor, rounding: bool) -> torch.Tensor:
    """A bound (n, M) on sum_i |G_i - fl(G_i)| for generators (n, M, S) stored in ``ZONOTOPE_DTYPE``: half an
    ulp of each (relative u in the normal range, plus the absolute spacing of subnormals below it)."""
    if not rounding:
        return block.new_zeros(block.shape[:2])
    finfo = torch.finfo(ZONOTOPE_DTYPE)
    return block.abs().sum(-1) * (finfo.eps / 2) * (1 + 1e-6) + block.shape[2] * finfo.smallest_normal * finfo.eps


def _columns(weight: torch.Tensor, mask: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """weight[:, i] * values[b, i] for the i where mask[b] (M, n) is True, per input b: (n_out, M, S),
    S the largest count, padded with zero columns."""
    chosen, _ = _positions(mask, mask.shape[1])  # (M, S) padded with n, where the padded values are 0
    columns = F.pad(weight, (0, 1)).index_select(1, chosen.flatten()).view(weight.shape[0], *chosen.shape)
    return columns * F.pad(values, (0, 1)).gather(1, chosen)


ZONOTOPE_BUDGET = 1 << 24  # generator coefficients (128 MB in float64) above which zonotopes are not used
ZONOTOPE_FROM = 1 / 8  # the share of unstable neurons left by interval steps from which a zonotope is started


def _zonotope_pays(lower: torch.Tensor, upper: torch.Tensor, symbols: int) -> bool:
    """Whether to start a zonotope for boxes (F, n) left by interval steps: they leave many neurons unstable
    (a zonotope costs about as much as back-substituting an eighth of them), and it fits the budget."""
    unstable = float(((lower < 0) & (upper > 0)).to(lower.dtype).mean()) if lower.numel() else 0.0
    return unstable > ZONOTOPE_FROM and lower.shape[1] * len(lower) * symbols <= ZONOTOPE_BUDGET


class _Owner:
    """The inputs (B,) that blocks of rows belong to, increasing; ``pick`` selects their entries of a
    per-input tensor, as a view when they are consecutive (chunks of all inputs usually are). A copy of
    the per-input weights costs about as much as a product with them, hence runs are preferred."""

    def __init__(self, index: torch.Tensor) -> None:
        self.index = index
        first = int(index[0]) if len(index) else 0
        self.run = (
            slice(first, first + len(index)) if not len(index) or int(index[-1]) == first + len(index) - 1 else None
        )

    def pick(self, values: torch.Tensor) -> torch.Tensor:
        return values[self.run] if self.run is not None else values.index_select(0, self.index)


def _positions(mask: torch.Tensor, fill: int, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The indices (B, width) of the True entries of each row of ``mask`` (B, n), in order, padded with
    ``fill``, and which are not padding; ``width`` defaults to the largest count of a row."""
    counts = mask.sum(1, keepdim=True)  # (B, 1)
    width = (int(counts.max()) if len(mask) else 0) if width is None else width
    order = torch.sort(mask.to(torch.uint8), dim=1, descending=True, stable=True).indices[:, :width]
    valid = torch.arange(width) < counts
    return torch.where(valid, order, fill), valid


def _submatrices(matrix: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """matrix[rows[b]][:, columns[b]] for each b: (B, R, C) from rows (B, R) and columns (B, C). (Two
    gathers, one per dimension, are about twice as fast as torch's indexing with both at once.)"""
    picked = matrix.index_select(0, rows.flatten()).view(*rows.shape, matrix.shape[1])  # (B, R, n)
    return picked.gather(2, columns.unsqueeze(1).expand(-1, rows.shape[1], -1))


def _chunks(count: int, size: int) -> list[slice]:
    """Slices of ``count`` items of ``size`` numbers each, ``CHUNK`` numbers at a time (at least one item,
    and one empty slice if ``count`` is 0)."""
    step = max(1, CHUNK // max(size, 1))
    return [slice(start, start + step) for start in range(0, max(count, 1), step)]


def _dot(rows: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """rows (..., B, X, A) . vectors (B, A) -> (..., B, X)."""
    return (rows @ vectors.unsqueeze(-1)).squeeze(-1)


def _unbounded(n: int, width: int, dtype: torch.dtype) -> Box:
    """The box (-inf, inf) of shape (n, width)."""
    return torch.full((n, width), -math.inf, dtype=dtype), torch.full((n, width), math.inf, dtype=dtype)


def _interval_step(layer: Affine, lower: torch.Tensor, upper: torch.Tensor) -> Box:
    """One interval step: the box of W relu(z) + b over the pre-activation box [lower, upper]."""
    low, up = F.relu(lower), F.relu(upper)
    center = layer((low + up) / 2)
    radius = layer((up - low) / 2, layer.weight.abs(), torch.zeros_like(layer.bias))
    return center - radius, center + radius


def following_linear_layers(network: ReluNetwork, layer: int) -> list[Affine]:
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
