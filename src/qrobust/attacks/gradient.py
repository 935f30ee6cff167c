"""Gradient attacks in an l_inf or l2 ball: PGD (Madry et al.), its deterministic form IFGSM, and FGSM.

One loop serves them all: ``steps`` steepest-ascent steps of the loss, each followed by projection onto
the eps ball around x and clipping to [0, 1]. Clipping keeps the perturbation inside the ball, since x
itself lies in [0, 1].
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from qrobust.attacks.base import Attack, check_integer, check_labels, check_real

NORMS = ("inf", "2")

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits (N, K), y (N, ...)) -> scalar


class PGD(Attack):
    """Projected gradient descent on the loss in the l_inf or l2 ball of radius ``eps``.

    Madry et al., "Towards Deep Learning Models Resistant to Adversarial Attacks" (ICLR 2018): start at a
    uniformly random point of the ball, take ``steps`` steps of size ``step_size`` along the loss's
    steepest ascent direction for the norm (the gradient's sign for l_inf, the gradient over its l2
    norm for l2) and project back onto the ball after each. Without the random start this is IFGSM
    (Kurakin et al., "Adversarial Examples in the Physical World", 2017), e.g. eps 0.031, step 1/255,
    20 steps in the EnResNet/Binary-Relax robustness benchmarks.

    Args:
        model: maps float images (N, C, H, W) in [0, 1] to logits (N, K).
        norm: "inf" or "2", the norm of the ball.
        eps: radius of the ball, >= 0, in [0, 1] pixel units.
        step_size: length of each step in that norm, >= 0.
        steps: number of steps, >= 1.
        random_start: start uniformly in the ball (True, Madry's PGD) or at x (False, IFGSM).
        targeted: descend the loss instead of ascending it; with the default loss, ``y`` holds the
            target classes and the attack minimises the cross-entropy to them.
        loss: ``loss(logits, y)``, a scalar to maximise (default: summed cross-entropy, ``y`` int64
            labels). Any ``y`` the loss understands works, e.g. the clean class probabilities (N, K)
            with a KL objective, as TRADES needs.
        generator: the random start's source (a seeded generator makes runs reproducible).

    Shapes: x (N, C, H, W) in [0, 1], y (N,) -> x_adv (N, C, H, W) in [0, 1], ||x_adv - x||_norm <= eps.

    Example:
        >>> x_adv = PGD(model, eps=8 / 255, step_size=2 / 255, steps=10)(x, y)
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        norm: str = "inf",
        eps: float,
        step_size: float,
        steps: int,
        random_start: bool = True,
        targeted: bool = False,
        loss: Loss | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(model)
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {', '.join(map(repr, NORMS))}, got {norm!r}")
        if loss is not None and not callable(loss):
            raise ValueError(f"loss must be a callable loss(logits, y) -> scalar, got {type(loss).__name__}")
        self.norm = norm
        self.eps = check_real("eps", eps, positive=False)
        self.step_size = check_real("step_size", step_size, positive=False)
        self.steps = check_integer("steps", steps, 1)
        self.random_start = bool(random_start)
        self.targeted = bool(targeted)
        self.loss = loss
        self.generator = generator

    def hyperparameters(self) -> dict[str, object]:
        settings: dict[str, object] = {
            "norm": self.norm,
            "eps": self.eps,
            "step_size": self.step_size,
            "steps": self.steps,
            "random_start": self.random_start,
            "targeted": self.targeted,
        }
        if self.loss is not None:
            settings["loss"] = self.loss
        return settings

    def _perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x_adv = (x + random_in_ball(x, self.norm, self.eps, self.generator)).clamp_(0, 1) if self.random_start else x
        for _ in range(self.steps):
            _, grad = self._input_gradient(x_adv, lambda logits: self._objective(logits, y))
            self._check_gradient(grad)
            delta = x_adv + self.step_size * steepest_ascent(grad, self.norm) - x
            x_adv = (x + project(delta, self.norm, self.eps)).clamp_(0, 1)
        return x_adv

    def _objective(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The scalar the attack ascends: the loss, negated when targeted."""
        if self.loss is None:
            check_labels(y, logits.shape[1])
            value = F.cross_entropy(logits, y, reduction="sum")
        else:
            value = self.loss(logits, y)
        return -value if self.targeted else value


class FGSM(PGD):
    """Fast gradient sign method: x + eps * sign(grad of the loss), clipped to [0, 1].

    Goodfellow et al., "Explaining and Harnessing Adversarial Examples" (ICLR 2015); one l_inf PGD step
    of size eps without random start. ``targeted`` and ``loss`` are as for ``PGD``.

    Shapes: x (N, C, H, W) in [0, 1], y (N,) -> x_adv (N, C, H, W) in [0, 1], ||x_adv - x||_inf <= eps.

    Example:
        >>> x_adv = FGSM(model, eps=0.031)(x, y)
    """

    def __init__(self, model: nn.Module, eps: float, *, targeted: bool = False, loss: Loss | None = None) -> None:
        eps = check_real("eps", eps, positive=False)
        super().__init__(
            model, norm="inf", eps=eps, step_size=eps, steps=1, random_start=False, targeted=targeted, loss=loss
        )

    def hyperparameters(self) -> dict[str, object]:
        settings = super().hyperparameters()
        return {name: settings[name] for name in ("eps", "targeted", "loss") if name in settings}


def steepest_ascent(grad: torch.Tensor, norm: str) -> torch.Tensor:
    """The direction of unit ``norm`` that increases the loss fastest: sign(grad) for l_inf, grad / ||grad||_2
    per example for l2 (zero where the gradient is zero)."""
    if norm == "inf":
        return grad.sign()
    return grad / _l2(grad).clamp_min(1e-12)


def project(delta: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
    """The nearest point to each perturbation of ``delta`` (N, ...) in the ``norm`` ball of radius ``eps``."""
    if norm == "inf":
        return delta.clamp(-eps, eps)
    return delta * (eps / _l2(delta).clamp_min(1e-12)).clamp(max=1.0)


def random_in_ball(x: torch.Tensor, norm: str, eps: float, generator: torch.Generator | None) -> torch.Tensor:
    """Perturbations shaped like ``x``, drawn uniformly from the ``norm`` ball of radius ``eps``.

    l2: a Gaussian direction scaled to radius eps * U^(1/d), d the dimension of one image. The noise is
    drawn on the generator's device (x's without one) and moved to x's.
    """
    device = x.device if generator is None else generator.device
    if norm == "inf":
        return ((2 * torch.rand(x.shape, generator=generator, device=device, dtype=x.dtype) - 1) * eps).to(x.device)
    direction = torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype)
    dimension = x[0].numel()
    uniform = torch.rand(x.shape[0], generator=generator, device=device, dtype=x.dtype)  # (N,)
    radius = eps * uniform ** (1.0 / dimension)
    return (direction / _l2(direction).clamp_min(1e-12) * radius.view(-1, *[1] * (x.dim() - 1))).to(x.device)


def _l2(t: torch.Tensor) -> torch.Tensor:
    """Per-example l2 norms of ``t`` (N, ...), shaped (N, 1, ..., 1) to broadcast against it."""
    return t.flatten(1).norm(dim=1).view(-1, *[1] * (t.dim() - 1))
