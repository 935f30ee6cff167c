"""The fault sneaking attack: perturb one layer's weights so chosen images get chosen labels, others none.

Zhao, Wang, Gongye, Wang, Fei and Lin, "Fault Sneaking Attack: a Stealthy Framework for Misleading Deep
Neural Networks" (DAC 2019): find the smallest change delta of a single layer's parameters such that
each target image x_i is classified as its target t_i while the kept images x_j keep their labels y_j
(by default the model's own predictions). Zhao et al. minimise ||delta||_0 or ||delta||_2 with ADMM; we
minimise the l_inf, l2 or l1 (a convex stand-in for l0) norm by bisection on the radius r of the norm
ball: at each r, Adam steps on the summed hinge margins

    sum_i max(max_{j != t_i} z_j(x_i) - z_{t_i}(x_i) + kappa, 0) + sum_j max(max_{c != y_j} z_c(x_j) - z_{y_j}(x_j) + kappa, 0)

each followed by projection onto {||delta||_p <= r}; r counts as feasible when every target image is
classified as its target and every kept image keeps its label. This is the threat model whose
perturbation norms Weng et al. (AAAI 2020, Table 1) compare with the certified weight-perturbation bound.

Unlike the input attacks of ``qrobust.attacks`` it perturbs weights, so calling it returns a
``FaultSneakingResult`` (the perturbation, its norms and the per-image outcome), not adversarial images.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from qrobust.attacks.base import check_batch, check_integer, check_labels, check_real, evaluation_mode
from qrobust.quant.admm import quantizable_layers

NORMS = ("inf", "2", "1")
MAX_DOUBLINGS = 16  # the initial radius times 2^16 at most: larger weight changes are no stealthy attack


@dataclass(frozen=True)
class FaultSneakingResult:
    """What the attack found for one layer.

    ``radius`` is the smallest feasible ball radius the search found (inf if none was), ``linf``, ``l2``
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

    @property
    def feasible(self) -> bool:
        """Every target hit and every kept image kept."""
        return bool(self.success.all()) and bool(self.kept.all())

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
        kappa: hinge margin in logits, >= 0 (default 0.01): constraints count as met in the loss once
            the right logit leads by kappa.
        steps: Adam steps per radius, >= 1.
        search_steps: bisection steps on the radius after a feasible one is found, >= 1.
        initial_radius: the first radius tried (> 0); it doubles until one is feasible (at most 16 times).
        step_fraction: Adam's learning rate as a fraction of r / P^(1/p), the coordinate size of a
            radius-r ball spread evenly over the P perturbed parameters (> 0).

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
        kappa: float = 0.01,
        steps: int = 100,
        search_steps: int = 10,
        initial_radius: float = 0.01,
        step_fraction: float = 0.1,
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

    def hyperparameters(self) -> dict[str, object]:
        return {
            "layer": self.layer, "norm": self.norm, "bias": self.bias, "kappa": self.kappa, "steps": self.steps,
            "search_steps": self.search_steps, "initial_radius": self.initial_radius,
            "step_fraction": self.step_fraction,
        }  # fmt: skip

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.hyperparameters().items())})"

    def __call__(
        self,
        images: torch.Tensor,
        targets: torch.Tensor,
        keep_images: torch.Tensor,
        keep_labels: torch.Tensor | None = None,
    ) -> FaultSneakingResult:
        """Attack: ``images`` to ``targets``, ``keep_images`` stay at ``keep_labels`` (default: as predicted)."""
        check_batch(images, targets)
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
            return self._search(x, y, len(images))

    def _search(self, x: torch.Tensor, y: torch.Tensor, num_targets: int) -> FaultSneakingResult:
        """Double the radius until feasible, then bisect; keep the smallest feasible perturbation."""
        best, best_radius = None, float("inf")
        low, high = 0.0, self.initial_radius
        for _ in range(MAX_DOUBLINGS):
            delta = self._optimise(x, y, high)
            if self._hits(x, y, delta).all():
                best, best_radius = delta, high
                break
            low, high = high, 2 * high
        if best is not None:
            for _ in range(self.search_steps):
                middle = (low + high) / 2
                delta = self._optimise(x, y, middle)
                if self._hits(x, y, delta).all():
                    best, best_radius, high = delta, middle, middle
                else:
                    low = middle
        final = best if best is not None else self._optimise(x, y, high)  # infeasible: the last attempt
        hits = self._hits(x, y, final)
        weight, bias = self._split(final.clone())
        magnitude = final.abs()
        return FaultSneakingResult(
            self.name, weight, bias, best_radius, float(magnitude.max()), float(final.norm()),
            int((magnitude > 0).sum()), hits[:num_targets], hits[num_targets:],
        )  # fmt: skip

    def _zero(self) -> torch.Tensor:
        count = self.module.weight.numel() + (self.module.bias.numel() if self.bias else 0)
        return self.module.weight.new_zeros(count)

    def _split(self, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The flat perturbation (P,) as views (weight delta, bias delta or None)."""
        n = self.module.weight.numel()
        return delta[:n].view_as(self.module.weight), (delta[n:].view_as(self.module.bias) if self.bias else None)

    def _logits(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """The model's logits with the flat perturbation ``delta`` added to the layer."""
        weight, bias = self._split(delta)
        parameters = {f"{self.name}.weight": self.module.weight.detach() + weight}
        if bias is not None:
            parameters[f"{self.name}.bias"] = self.module.bias.detach() + bias
        return functional_call(self.model, parameters, (x,))

    def _hits(self, x: torch.Tensor, y: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self._logits(x, delta).argmax(1) == y  # (S + R,)

    def _optimise(self, x: torch.Tensor, y: torch.Tensor, radius: float) -> torch.Tensor:
        """Adam on the summed hinge margins in the ``radius`` ball from delta = 0, projecting after each
        step; stops once every image has its label.

        Adam moves every coordinate by about its learning rate, so that is ``step_fraction`` times the
        size r / P^(1/p) of a coordinate when the radius is spread evenly over the P coordinates.
        """
        delta = self._zero().requires_grad_(True)
        spread = {"inf": 1.0, "2": delta.numel() ** 0.5, "1": float(delta.numel())}[self.norm]
        optimizer = torch.optim.Adam([delta], lr=self.step_fraction * radius / spread)
        for _ in range(self.steps):
            logits = self._logits(x, delta)  # (S + R, K)
            right = logits.gather(1, y[:, None]).squeeze(1)  # (S + R,)
            others = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(1)
            if bool((right > others).all()):
                break
            optimizer.zero_grad(set_to_none=True)
            torch.clamp(others - right + self.kappa, min=0).sum().backward()
            optimizer.step()
            with torch.no_grad():
                delta.copy_(_project(delta, self.norm, radius))
        return delta.detach()


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
