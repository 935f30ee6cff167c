"""FGSM and PGD: strength on trained models, exact answers on linear models, the eps ball, the random start."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from qrobust.attacks import FGSM, PGD, robust_accuracy
from qrobust.attacks.gradient import random_in_ball

from .conftest import ATTACKS, accuracy, linear_problem


def _norm(delta: torch.Tensor, norm: str) -> torch.Tensor:
    flat = delta.flatten(1)
    return flat.abs().amax(1) if norm == "inf" else flat.norm(dim=1)


@pytest.mark.parametrize("name", ATTACKS)
@pytest.mark.parametrize("trained", ["digits", "fashion"])
def test_no_attack_raises_accuracy(name, trained, request):
    trained = request.getfixturevalue(trained)
    x, y = trained.images[:200], trained.labels[:200]
    clean = accuracy(trained.model, x, y)
    assert clean > 0.75
    assert robust_accuracy(trained.model, ATTACKS[name](trained.model), x, y) < clean


@pytest.mark.parametrize(
    "attack",
    [
        lambda m: FGSM(m, 0.05),
        lambda m: PGD(m, eps=0.05, step_size=0.02, steps=5, random_start=False),
        lambda m: PGD(m, eps=0.05, step_size=0.02, steps=5, generator=torch.Generator().manual_seed(1)),
        lambda m: PGD(m, norm="2", eps=0.5, step_size=0.2, steps=5, random_start=False),
        lambda m: PGD(m, norm="2", eps=0.5, step_size=0.2, steps=5, generator=torch.Generator().manual_seed(1)),
        lambda m: PGD(m, norm="2", eps=0.5, step_size=0.2, steps=5, targeted=True),
    ],
)
def test_examples_stay_in_the_eps_ball_and_the_unit_interval(attack, digits):
    attack = attack(digits.model)
    x, y = digits.images, digits.labels
    x_adv = attack(x, y if not attack.targeted else (y + 1) % 10)
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    distances = _norm(x_adv - x, attack.norm)
    assert distances.max() <= attack.eps * (1 + 1e-5)
    assert distances.median() >= 0.5 * attack.eps  # the steps really went out towards the boundary


@pytest.mark.parametrize(("trained", "eps"), [("digits", 0.15), ("fashion", 0.1)])
def test_pgd20_is_at_least_as_strong_as_fgsm(trained, eps, request):
    trained = request.getfixturevalue(trained)
    x, y = trained.images, trained.labels
    fgsm = robust_accuracy(trained.model, FGSM(trained.model, eps), x, y)
    pgd = PGD(trained.model, eps=eps, step_size=eps / 10, steps=20, generator=torch.Generator().manual_seed(0))
    assert robust_accuracy(trained.model, pgd, x, y) <= fgsm  # 0.195 vs 0.265 (digits), 0.046 vs 0.106 (fashion)


def test_undefended_fashion_mnist_model_falls_below_10_percent_at_eps_0_1(fashion):
    clean = accuracy(fashion.model, fashion.images, fashion.labels)
    pgd = PGD(fashion.model, eps=0.1, step_size=0.01, steps=20, generator=torch.Generator().manual_seed(0))
    robust = robust_accuracy(fashion.model, pgd, fashion.images, fashion.labels)
    assert clean > 0.8 and robust < 0.10


@pytest.mark.parametrize(("norm", "eps"), [("inf", 0.03), ("2", 0.08)])
def test_pgd_finds_the_exact_minimal_perturbation_of_a_linear_model(norm, eps):
    """For two classes the cross-entropy only depends on the margin, so PGD must reach the boundary of
    every example whose exact distance is below eps, and (soundness) nothing can cross it from farther."""
    model, x, y = linear_problem(num_classes=2)
    distance = model.distance(x, norm)
    near, far = distance < 0.98 * eps, distance > eps
    assert near.sum() >= 20 and far.sum() >= 20
    attack = PGD(model, norm=norm, eps=eps, step_size=eps / 5, steps=20, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fooled = model(attack(x, y)).argmax(1) != y
    assert fooled[near].all()
    assert not fooled[far].any()


@pytest.mark.parametrize("norm", ["inf", "2"])
def test_the_random_start_is_uniform_in_the_ball(norm):
    eps, x = 0.3, torch.zeros(4000, 1, 2, 3)
    delta = random_in_ball(x, norm, eps, torch.Generator().manual_seed(0))
    if norm == "inf":  # independent uniform coordinates on [-eps, eps]
        sample, expected = delta.flatten().numpy(), stats.uniform(-eps, 2 * eps).cdf
    else:  # radius eps * U^(1/d): (radius / eps)^d is uniform on [0, 1]
        sample, expected = ((delta.flatten(1).norm(dim=1) / eps) ** 6).numpy(), stats.uniform().cdf
        directions = delta.flatten(1) / delta.flatten(1).norm(dim=1, keepdim=True)
        assert directions.mean(0).abs().max() < 0.05  # no preferred direction
    assert stats.kstest(sample, expected).pvalue > 0.001
    assert np.abs(sample).max() <= (eps if norm == "inf" else 1.0) + 1e-6


def test_a_seeded_generator_reproduces_the_random_start(digits):
    x, y = digits.images[:32], digits.labels[:32]

    def run(seed: int) -> torch.Tensor:
        return PGD(digits.model, eps=0.1, step_size=0.02, steps=3, generator=torch.Generator().manual_seed(seed))(x, y)

    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))


def test_fgsm_is_one_signed_gradient_step(digits):
    x, y = digits.images[:64].clone().requires_grad_(True), digits.labels[:64]
    (grad,) = torch.autograd.grad(F.cross_entropy(digits.model(x), y), x)
    expected = (x.detach() + 0.07 * grad.sign()).clamp(0, 1)
    assert torch.allclose(FGSM(digits.model, 0.07)(x.detach(), y), expected, atol=1e-6)


def test_eps_zero_returns_the_input(digits):
    x, y = digits.images[:16], digits.labels[:16]
    assert torch.equal(FGSM(digits.model, 0)(x, y), x)
    assert torch.equal(PGD(digits.model, norm="2", eps=0, step_size=0, steps=2)(x, y), x)


def test_targeted_pgd_reaches_the_target(digits):
    x, y = digits.images, digits.labels
    target = (y + 1) % 10
    generator = torch.Generator().manual_seed(0)
    attack = PGD(digits.model, eps=0.3, step_size=0.03, steps=20, targeted=True, generator=generator)
    with torch.no_grad():
        reached = digits.model(attack(x, target)).argmax(1) == target
    assert reached.float().mean() > 0.9


def test_a_custom_objective_takes_probability_targets_as_trades_needs(digits):
    """TRADES maximises KL(f(x) || f(x')) with the clean probabilities as ``y``."""
    model, x = digits.model, digits.images

    def kl_objective(logits: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
        return F.kl_div(F.log_softmax(logits, dim=1), clean, reduction="sum")

    with torch.no_grad():
        clean = F.softmax(model(x), dim=1)  # (N, K) float
    generator = torch.Generator().manual_seed(0)
    attack = PGD(model, loss=kl_objective, eps=0.1, step_size=0.02, steps=10, generator=generator)
    x_adv = attack(x, clean)
    noise = (x + random_in_ball(x, "inf", 0.1, torch.Generator().manual_seed(0))).clamp(0, 1)
    with torch.no_grad():
        attacked, random = (kl_objective(model(z), clean).item() / len(x) for z in (x_adv, noise))
    assert _norm(x_adv - x, "inf").max() <= 0.1 + 1e-6
    assert attacked > 0.5 and attacked > 20 * random  # 0.85 and 0.011 here
