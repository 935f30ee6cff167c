"""Training objectives: natural, PGD adversarial training, TRADES and the alpha/beta trade-off loss.

Each objective maps (model, inputs, labels) to (loss, logits) where the logits are those of the inputs
the model was trained on, for the running accuracy. Adversarial examples come from
``qrobust.attacks.PGD``, so there is one PGD in the library; attacks run the model in eval mode, so
batch-norm statistics come from the training batches only, as in the TRADES reference code.

* natural: cross-entropy. With noise augmentation (``TrainConfig.sigma``) this is Gaussian /
  discrete-noise training for randomized smoothing (Cohen et al. 2019).
* trade-off (eq. 8 of Zhou et al., "Binary-Relax, EnResNet and a trade-off loss"):
  alpha * CE(f(x), y) + beta * CE(f(x'), y) with x' the PGD maximiser of CE in the eps-ball.
  alpha = 0, beta = 1 is PGD adversarial training (Madry et al. 2018).
* TRADES (eq. 7, Zhang et al. 2019): CE(f(x), y) + beta * KL(f(x) || f(x')) with x' the PGD
  maximiser of that KL.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qrobust.attacks import PGD
from qrobust.attacks.base import evaluation_mode

Objective = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Generator | None], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class AttackConfig:
    """The l_inf PGD that crafts training adversaries; defaults are Madry et al.'s CIFAR-10 values."""

    eps: float = 0.031
    step_size: float = 0.007
    steps: int = 10

    def pgd(self, model: nn.Module, generator: torch.Generator | None, loss=None) -> PGD:
        return PGD(
            model,
            norm="inf",
            eps=self.eps,
            step_size=self.step_size,
            steps=self.steps,
            random_start=True,
            loss=loss,
            generator=generator,
        )


def natural_loss(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, generator=None):
    """Cross-entropy on the inputs as given."""
    logits = model(inputs)
    return F.cross_entropy(logits, labels), logits


@dataclass(frozen=True)
class TradeoffLoss:
    """alpha * CE(f(x), y) + beta * CE(f(x'), y), x' = PGD(x) (eq. 8); (0, 1) is PGD adversarial training."""

    alpha: float
    beta: float
    attack: AttackConfig

    def __call__(self, model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, generator=None):
        adversarial = self.attack.pgd(model, generator)(inputs, labels)
        adversarial_logits = model(adversarial)
        loss = self.beta * F.cross_entropy(adversarial_logits, labels)
        if self.alpha == 0:
            return loss, adversarial_logits
        logits = model(inputs)
        return loss + self.alpha * F.cross_entropy(logits, labels), logits


@dataclass(frozen=True)
class TradesLoss:
    """CE(f(x), y) + beta * KL(f(x) || f(x')), x' = PGD maximiser of the KL (eq. 7)."""

    beta: float
    attack: AttackConfig

    def __call__(self, model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, generator=None):
        with torch.no_grad(), evaluation_mode(model):
            clean_probabilities = F.softmax(model(inputs), dim=1)
        adversarial = self.attack.pgd(model, generator, loss=kl_from)(inputs, clean_probabilities)
        logits = model(inputs)
        robust = kl_from(model(adversarial), F.softmax(logits, dim=1))
        return F.cross_entropy(logits, labels) + self.beta * robust, logits


def kl_from(logits: torch.Tensor, target_probabilities: torch.Tensor) -> torch.Tensor:
    """Batch mean of KL(target || softmax(logits)), the TRADES robustness term."""
    return F.kl_div(F.log_softmax(logits, dim=1), target_probabilities, reduction="batchmean")


LOSSES = ("natural", "gaussian", "pgd", "trades", "tradeoff")


def make_objective(loss: str, *, alpha: float, beta: float, attack: AttackConfig) -> Objective:
    """The objective called ``loss``; "gaussian" is the natural loss on noise-augmented inputs."""
    if loss in ("natural", "gaussian"):
        return natural_loss
    if loss == "pgd":
        return TradeoffLoss(0.0, 1.0, attack)
    if loss == "tradeoff":
        return TradeoffLoss(alpha, beta, attack)
    if loss == "trades":
        return TradesLoss(beta, attack)
    raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")
