"""Carlini-Wagner l2: success on undefended models, closeness to the exact minimum on linear models."""

from __future__ import annotations

import pytest
import torch

from qrobust.attacks import CarliniWagnerL2

from .conftest import linear_problem


def _l2(x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return (x_adv - x).flatten(1).norm(dim=1)


@pytest.mark.parametrize(("trained", "n"), [("digits", 200), ("fashion", 100)])
def test_finds_adversarials_for_nearly_every_correctly_classified_example(trained, n, request):
    trained = request.getfixturevalue(trained)
    x, y = trained.images[:n], trained.labels[:n]
    with torch.no_grad():
        correct = trained.model(x).argmax(1) == y
        fooled = trained.model(CarliniWagnerL2(trained.model)(x, y)).argmax(1) != y
    assert fooled[correct].float().mean() >= 0.95


@pytest.mark.parametrize("num_classes", [2, 5])
def test_finds_the_exact_minimal_l2_perturbation_of_a_linear_model(num_classes):
    """Never below the exact distance (that would be a false success), and mostly close to it: Adam
    overshoots boundaries that are close compared with its steps, and with five classes the descent
    may settle on a boundary that is not the nearest."""
    model, x, y = linear_problem(num_classes, n=200)
    exact = model.distance(x, "2")
    x_adv = CarliniWagnerL2(model)(x, y)
    with torch.no_grad():
        assert (model(x_adv).argmax(1) != y).all()
    ratio = _l2(x_adv, x) / exact
    assert ratio.min() >= 1 - 1e-3
    assert ratio.median() <= 1.05
    assert ratio.quantile(0.9) <= (1.1 if num_classes == 2 else 1.25)


def test_confidence_buys_margin_with_distance(digits):
    x, y = digits.images[:100], digits.labels[:100]
    plain, confident = (CarliniWagnerL2(digits.model, confidence=kappa)(x, y) for kappa in (0.0, 5.0))
    with torch.no_grad():
        logits = digits.model(confident)
    own = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.scatter(1, y[:, None], float("-inf")).amax(1)
    succeeded = others - own > 5.0
    assert succeeded.float().mean() >= 0.9
    assert _l2(confident, x)[succeeded].median() > 1.2 * _l2(plain, x)[succeeded].median()


def test_targeted_attack_reaches_the_target(digits):
    x, y = digits.images[:100], digits.labels[:100]
    target = (y + 3) % 10
    with torch.no_grad():
        reached = digits.model(CarliniWagnerL2(digits.model, targeted=True)(x, target)).argmax(1) == target
    assert reached.float().mean() >= 0.95


def test_examples_it_cannot_fool_come_back_unchanged(digits):
    x, y = digits.images[:32], digits.labels[:32]
    hopeless = CarliniWagnerL2(digits.model, confidence=1e4, steps=5, search_steps=2)
    assert torch.equal(hopeless(x, y), x)


def test_only_the_smallest_success_is_kept_across_search_rounds(digits):
    """More binary-search rounds can only shrink each example's perturbation (the runs share rounds 1-3)."""
    x, y = digits.images[:64], digits.labels[:64]
    short, long = (CarliniWagnerL2(digits.model, steps=30, search_steps=s)(x, y) for s in (3, 6))
    assert (_l2(long, x) <= _l2(short, x) + 1e-6).all()
    assert _l2(long, x).sum() < _l2(short, x).sum()
