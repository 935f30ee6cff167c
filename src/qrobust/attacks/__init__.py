"""Adversarial attacks and robust accuracy: FGSM, PGD / IFGSM (l_inf, l2), Carlini-Wagner l2.

Attacks are configured once and called on batches of [0, 1] images; evaluation is by accuracy::

    pgd = PGD(model, eps=0.031, step_size=0.007, steps=10)
    x_adv = pgd(x, y)
    evaluate_attacks({"fp32": model}, {"natural": None, "fgsm": FGSM(model, 0.031), "pgd": pgd}, images, labels)

Quantized models: rounding has zero gradient, so attack the QAT twin (straight-through gradients) and
evaluate the int8 model on the result, ``evaluate_attacks({"qat": qat, "int8": LatticeInputs(int8)}, {"pgd":
PGD(qat, ...)}, ...)``.
Smoothed classifiers: attack ``ExpectationOverNoise(model, sigma, samples)``.
Weights instead of inputs: ``FaultSneakingAttack(model, layer=k)(images, targets, keep_images)`` (Zhao et al. 2019).
"""

from qrobust.attacks.base import Attack, GradientMaskingWarning
from qrobust.attacks.cw import CarliniWagnerL2
from qrobust.attacks.evaluate import evaluate_attacks, robust_accuracy
from qrobust.attacks.fault_sneaking import FaultSneakingAttack, FaultSneakingResult
from qrobust.attacks.gradient import FGSM, PGD
from qrobust.attacks.wrappers import ExpectationOverNoise, LatticeInputs

__all__ = [
    "FGSM",
    "PGD",
    "Attack",
    "CarliniWagnerL2",
    "ExpectationOverNoise",
    "FaultSneakingAttack",
    "FaultSneakingResult",
    "GradientMaskingWarning",
    "LatticeInputs",
    "evaluate_attacks",
    "robust_accuracy",
]
