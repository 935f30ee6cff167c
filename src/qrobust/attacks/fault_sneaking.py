"""The fault sneaking attack: perturb one layer's weights so chosen images get chosen labels, others none.

Zhao, Wang, Gongye, Wang, Fei and Lin, "Fault Sneaking Attack: a Stealthy Framework for Misleading Deep
Neural Networks" (DAC 2019): find the smallest change delta of a single layer's parameters such that
each target image x_i is classified as its target t_i while the kept images x_j keep their labels y_j
(by default the model's own predictions). Zhao et al. minimise ||delta||_0 or ||delta||_2 with ADMM, a
penalty (augmented Lagrangian) formulation; we minimise the l_inf, l2 or l1 (a convex stand-in for l0)
norm by bisection on the radius r of the norm ball, and at each r solve the feasibility problem with a
multiplier method in the spirit of their ADMM: Adam steps on the weighted hinge margins

    sum_i w_i max(max_{c != y_i} z_c(x_i) - z_{y_i}(x_i) + kappa, 0)    over targets (y_i = t_i) and kept images

each followed by projection onto {||delta||_p <= r}, where every image has its own weight w_i: it starts
at 1, is multiplied by ``penalty_growth`` after every step on which its hinge is active and divided by it
(down to 1) after every step on which it is not. The learning rate follows a cosine schedule from
``step_fraction`` times the coordinate size of the ball down to 0, so the last steps are fine enough to
land inside thin feasible regions.

Why a weight per image: with equal weights, a few target terms are drowned by hundreds of kept-image
terms, and in deep layers the features of same-class images are nearly collinear (neural collapse), so
relabelling one image while keeping its near twins needs a change along their tiny difference. Growing
only the targets' weights hits them but sacrifices the twins (on the 10-layer Fashion-MNIST MLP, layer 7
kept at most 88% of 500 images at any radius); growing every violated constraint's weight, and letting
satisfied ones relax, balances the two (95% kept at l_inf 0.3 there, with about 1,000 steps per radius).
Why ``keep_fraction``: for the same reason the smallest change that
keeps *every* kept image can be orders of magnitude larger than one that lets a few of them flip (on a
10-layer Fashion-MNIST MLP, the exact linear program for the last layer needs l_inf 3.0 with margin 0.01
against 0.19 with margin 1e-6), so r counts as feasible when every target image is classified as its
target and at least ``keep_fraction`` of the kept images (default all) keep their labels. This is the
threat model whose perturbation norms Weng et al. (AAAI 2020, Table 1) compare with the certified
weight-perturbation bound.

Unlike the input attacks of ``qrobust.attacks`` it perturbs weights, so calling it returns a
``FaultSneakingResult`` (the perturbation, its norms and the per-image outcome), not adversarial images.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from qrobust.attacks.base import check_batch, check_integer, check_labels, check_real, evaluation_mode
from qrobust.devices import module_device
from qrobust.quant.admm import quantizable_layers

NORMS = ("inf", "2", "1")
Forward = Callable[[torch.Tensor], torch.Tensor]  # flat layer perturbation (P,) -> logits (N, K)
MAX_DOUBLINGS = 16  # the initial radius times 2^16 at most: larger weight changes are no stealthy attack


@dataclass(frozen=True)
class FaultSneakingResult:
    """What the attack found for one layer.

    ``radius`` is the smallest feasible ball radius the search found (inf if none was: the perturbation
    is then the smallest-radius attempt that hit every target, else the last attempt), ``linf``, ``l2``
    and ``l0`` the norms of the perturbation actually returned (weight and bias together; l0 counts the
    non-zero entries), ``success`` (S,) whether each target image gets its target label and ``kept``
    (R,) whether each kept image keeps its label, both under the perturbed model.
    """

    layer: str  # module name of the perturbed layer
    weight: torch.Tensor  # delta of the weight, its shape
    bias: torch.Tensor | None  # delta of the bias, or None when the bias was not attacked
    radius: float
    linf: float
    l2: float
    l0: int
    success: torch.Tensor  # bool (S,)
    kept: torch.Tensor  # bool (R,)
    keep_fraction: float = 1.0  # the share of kept images the attack had to keep

    @property
    def feasible(self) -> bool:
        """Every target hit and at least ``keep_fraction`` of the kept images kept."""
        return bool(self.success.all()) and int(self.kept.sum()) >= _required(self.keep_fraction, len(self.kept))

    def apply(self, model: nn.Module) -> nn.Module:
        """A copy of ``model`` with the perturbation added to the layer."""
        attacked = copy.deepcopy(model)
        module = dict(attacked.named_modules())[self.layer]
        with torch.no_grad():
            module.weight += self.weight
            if self.bias is not None:
                module.bias += self.bias
        return attacked


class FaultSneakingAttack:
    """Fault sneaking attack on layer ``layer`` (the k-th Linear/Conv2d module, 0-based) of ``model``.

    Args:
        model: maps float images (N, C, H, W) in [0, 1] to logits (N, K); it is not modified.
        layer: index k of the attacked Linear/Conv2d layer, in ``qrobust.quant.admm.quantizable_layers`` order.
        norm: "inf", "2" or "1", the norm of delta that is minimised.
        bias: also perturb the layer's bias (default False: weights only, as in Weng et al.'s Table 1).
        kappa: hinge margin in logits, >= 0 (default 0.001): constraints count as met in the loss once
            the right logit leads by kappa (feasibility itself only asks for the right argmax).
        steps: Adam steps per radius (at most; it stops once feasible), >= 1 (default 1000).
        search_steps: bisection steps on the radius after a feasible one is found, >= 1.
        initial_radius: the first radius tried (> 0); it doubles until one is feasible (at most 16 times).
        step_fraction: Adam's initial learning rate as a fraction of r / P^(1/p), the coordinate size of
            a radius-r ball spread evenly over the P perturbed parameters (> 0); it decays to 0 (cosine).
        penalty_growth: factor (>= 1, default 1.01) on an image's loss weight after every step on which
            its hinge is active (divided out, down to 1, when it is not); 1 gives the plain hinge sum.
        keep_fraction: share of the kept images that must keep their labels for a radius to count as
            feasible, in (0, 1] (default 1: all of them).

    Shapes: images (S, C, H, W), targets (S,), keep_images (R, C, H, W), keep_labels (R,) -> result.

    Example:
        >>> result = FaultSneakingAttack(model, layer=3)(x[:4], torch.tensor([1, 2, 3, 4]), x[4:500])
        >>> result.linf, result.success, accuracy(result.apply(model), test_images, test_labels)
    """

    def __init__(
        self,
        model: nn.Module,
        layer: int,
        *,
        norm: str = "inf",
        bias: bool = False,
        kappa: float = 0.001,
        steps: int = 1000,
        search_steps: int = 10,
        initial_radius: float = 0.01,
        step_fraction: float = 0.1,
        penalty_growth: float = 1.01,
        keep_fraction: float = 1.0,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        layers = quantizable_layers(model)
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < len(layers):
            raise ValueError(f"layer must be an integer in 0..{len(layers) - 1} (Linear/Conv2d layers), got {layer!r}")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {', '.join(map(repr, NORMS))}, got {norm!r}")
        self.model = model
        self.layer = layer
        self.name, self.module = layers[layer]
        if bias and self.module.bias is None:
            raise ValueError(f"layer {layer} ({self.name}) has no bias to perturb")
        self.norm = norm
        self.bias = bool(bias)
        self.kappa = check_real("kappa", kappa, positive=False)
        self.steps = check_integer("steps", steps, 1)
        self.search_steps = check_integer("search_steps", search_steps, 1)
        self.initial_radius = check_real("initial_radius", initial_radius, positive=True)
        self.step_fraction = check_real("step_fraction", step_fraction, positive=True)
        self.penalty_growth = check_real("penalty_growth", penalty_growth, positive=True)
        if self.penalty_growth < 1:
            raise ValueError(f"penalty_growth must be >= 1, got {penalty_growth!r}")
        self.keep_fraction = check_real("keep_fraction", keep_fraction, positive=True)
        if self.keep_fraction > 1:
            raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction!r}")

    def hyperparameters(self) -> dict[str, object]:
        return {
            "layer": self.layer,
            "norm": self.norm,
            "bias": self.bias,
            "kappa": self.kappa,
            "steps": self.steps,
            "search_steps": self.search_steps,
            "initial_radius": self.initial_radius,
            "step_fraction": self.step_fraction,
            "penalty_growth": self.penalty_growth,
            "keep_fraction": self.keep_fraction,
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.hyperparameters().items())})"

    def __call__(
        self,
        images: torch.Tensor,
        targets: torch.Tensor,
        keep_images: torch.Tensor,
        keep_labels: torch.Tensor | None = None,
    ) -> FaultSneakingResult:
        """Attack: ``images`` to ``targets``, ``keep_images`` stay at ``keep_labels`` (default: as predicted);
        on the model's device, where the result's tensors are."""
        check_batch(images, targets)
        device = module_device(self.model)  # the attack runs there
        images, targets, keep_images = images.to(device), targets.to(device), keep_images.to(device)
        keep_labels = None if keep_labels is None else keep_labels.to(device)
        with evaluation_mode(self.model), torch.inference_mode(False), torch.enable_grad():
            with torch.no_grad():
                logits = self.model(images)
                if keep_labels is None:
                    keep_labels = self.model(keep_images).argmax(1)
            check_labels(targets, logits.shape[1])
            check_batch(keep_images, keep_labels)
            check_labels(keep_labels, logits.shape[1])
            x = torch.cat([images, keep_images]).detach()  # (S + R, C, H, W)
            y = torch.cat([targets, keep_labels])  # (S + R,)
            return self._search(self._forward(x), y, len(images))

    def _search(self, forward: Forward, y: torch.Tensor, num_targets: int) -> FaultSneakingResult:
        """Double the radius until feasible, then bisect; keep the smallest feasible perturbation.

        The doubling starts every radius from delta = 0; each bisection radius starts from the smallest
        feasible perturbation so far, clipped into the new ball. If no radius is feasible, the result
        carries the smallest-radius attempt that hit every target (else the last attempt), with ``radius``
        inf, so its norms and kept share show how close the attack came.
        """
        best, best_radius, fallback = None, float("inf"), None
        low, high = 0.0, self.initial_radius
        for _ in range(MAX_DOUBLINGS):
            delta = self._optimise(forward, y, num_targets, high, self._zero())
            hits = self._hits(forward, y, delta)
            if self._feasible(hits, num_targets):
                best, best_radius = delta, high
                break
            if fallback is None and hits[:num_targets].all():
                fallback = delta
            low, high = high, 2 * high
        if best is not None:
            for _ in range(self.search_steps):
                middle = (low + high) / 2
                delta = self._optimise(forward, y, num_targets, middle, best)
                if self._feasible(self._hits(forward, y, delta), num_targets):
                    best, best_radius, high = delta, middle, middle
                else:
                    low = middle
        final = best if best is not None else (fallback if fallback is not None else delta)
        hits = self._hits(forward, y, final)
        weight, bias = self._split(final.clone())
        magnitude = final.abs()
        return FaultSneakingResult(
            self.name,
            weight,
            bias,
            best_radius,
            float(magnitude.max()),
            float(final.norm()),
            int((magnitude > 0).sum()),
            hits[:num_targets],
            hits[num_targets:],
            self.keep_fraction,
        )

    def _layer_bias(self) -> torch.Tensor:
        """The layer's bias, read only when ``self.bias`` (``__init__`` refuses bias=True without one)."""
        bias = self.module.bias
        assert bias is not None
        return bias

    def _zero(self) -> torch.Tensor:
        count = self.module.weight.numel() + (self._layer_bias().numel() if self.bias else 0)
        return self.module.weight.new_zeros(count)

    def _split(self, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The flat perturbation (P,) as views (weight delta, bias delta or None)."""
        n = self.module.weight.numel()
        return delta[:n].view_as(self.module.weight), (delta[n:].view_as(self._layer_bias()) if self.bias else None)

    def _forward(self, x: torch.Tensor) -> Forward:
        """The map from a flat perturbation (P,) of the layer to the model's logits on ``x`` (N, K).

        The leaf modules that run before the layer do not depend on the perturbation, so a copy of the
        model replays their outputs on ``x`` (computed once) instead of recomputing them at every step.
        """
        model = _replaying(self.model, self.module, x)
        parameters = {name: value.detach() for name, value in model.named_parameters()}  # gradients for delta only

        def forward(delta: torch.Tensor) -> torch.Tensor:
            weight, bias = self._split(delta)
            changed = {f"{self.name}.weight": self.module.weight.detach() + weight}
            if bias is not None:
                changed[f"{self.name}.bias"] = self._layer_bias().detach() + bias
            return functional_call(model, parameters | changed, (x,))

        return forward

    def _feasible(self, hits: torch.Tensor, num_targets: int) -> bool:
        """Every target hit and enough kept images kept, from the per-image ``hits`` (S + R,)."""
        kept = hits[num_targets:]
        return bool(hits[:num_targets].all()) and int(kept.sum()) >= _required(self.keep_fraction, len(kept))

    def _hits(self, forward: Forward, y: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return forward(delta).argmax(1) == y  # (S + R,)

    def _optimise(
        self, forward: Forward, y: torch.Tensor, num_targets: int, radius: float, start: torch.Tensor
    ) -> torch.Tensor:
        """The multiplier method in the ``radius`` ball from ``start`` (P,): Adam on the hinge margins,
        each weighted by its own multiplier, projecting after each step; a multiplier (starting at 1) grows
        by ``penalty_growth`` on a step where its hinge is active and shrinks by it (down to 1) otherwise.
        Stops once feasible.

        Adam moves every coordinate by about its learning rate, so that starts at ``step_fraction`` times
        the size r / P^(1/p) of a coordinate when the radius is spread evenly over the P coordinates.
        """
        delta = _project(start, self.norm, radius).requires_grad_(True)
        spread = {"inf": 1.0, "2": delta.numel() ** 0.5, "1": float(delta.numel())}[self.norm]
        optimizer = torch.optim.Adam([delta], lr=self.step_fraction * radius / spread)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, self.steps)
        multipliers = torch.ones(len(y), dtype=delta.dtype, device=delta.device)  # (S + R,)
        for _ in range(self.steps):
            logits = forward(delta)  # (S + R, K)
            right = logits.gather(1, y[:, None]).squeeze(1)  # (S + R,)
            others = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(1)
            if self._feasible(right > others, num_targets):
                break
            hinge = torch.clamp(others - right + self.kappa, min=0)  # (S + R,)
            active = hinge.detach() > 0
            relaxed = (multipliers / self.penalty_growth).clamp(min=1)
            multipliers = torch.where(active, multipliers * self.penalty_growth, relaxed)
            optimizer.zero_grad(set_to_none=True)
            (multipliers * hinge).sum().backward()
            optimizer.step()
            schedule.step()
            with torch.no_grad():
                delta.copy_(_project(delta, self.norm, radius))
        return delta.detach()


class _Replay(nn.Module):
    """Stands in for a module whose output is known: returns it, whatever the input."""

    def __init__(self, output: torch.Tensor) -> None:
        super().__init__()
        self.output = output

    def forward(self, *args: object, **kwargs: object) -> torch.Tensor:
        return self.output.clone()  # a clone, so in-place operations downstream leave the cache intact


def _replaying(model: nn.Module, layer: nn.Module, x: torch.Tensor) -> nn.Module:
    """A copy of ``model`` in which every leaf module that runs once per forward pass, before ``layer``,
    returns its output on ``x`` (the same for every perturbation of ``layer``) without recomputing it."""
    calls: list[tuple[nn.Module, object]] = []
    leaves = [module for module in model.modules() if next(module.children(), None) is None]

    def record(module: nn.Module, args: object, output: object) -> None:
        calls.append((module, output))

    handles = [leaf.register_forward_hook(record) for leaf in leaves]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    modules = [module for module, _ in calls]
    replays = {
        module: _Replay(output)
        for module, output in calls[: modules.index(layer)]
        if modules.count(module) == 1 and isinstance(output, torch.Tensor)
    }
    names = {module: name for name, module in model.named_modules()}
    replaying = copy.deepcopy(model)
    for module, replay in replays.items():
        parent, _, child = names[module].rpartition(".")
        setattr(replaying.get_submodule(parent), child, replay)
    return replaying


def _required(fraction: float, count: int) -> int:
    """How many of ``count`` kept images a ``fraction`` asks for (rounded up, so 1.0 means all)."""
    return math.ceil(fraction * count - 1e-9)


def _project(delta: torch.Tensor, norm: str, radius: float) -> torch.Tensor:
    """Euclidean projection of the flat ``delta`` (P,) onto the ``norm`` ball of ``radius``."""
    if norm == "inf":
        return delta.clamp(-radius, radius)
    if norm == "2":
        length = delta.norm()
        return delta if length <= radius else delta * (radius / length)
    magnitude = delta.abs()
    if magnitude.sum() <= radius:
        return delta
    # l1 ball (Duchi et al., ICML 2008): soft-threshold at the theta that leaves l1 norm = radius.
    ordered = magnitude.sort(descending=True).values  # (P,)
    sums = ordered.cumsum(0)
    ranks = torch.arange(1, len(ordered) + 1, dtype=delta.dtype, device=delta.device)
    count = int((ordered * ranks > sums - radius).nonzero().max()) + 1
    theta = (sums[count - 1] - radius) / count
    return torch.sign(delta) * torch.clamp(magnitude - theta, min=0)
