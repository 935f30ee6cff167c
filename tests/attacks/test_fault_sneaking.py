"""The fault sneaking attack (Zhao et al. 2019) on the digits MLP: targets hit, others kept, norms honest."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from qrobust.attacks import FaultSneakingAttack
from qrobust.attacks.fault_sneaking import _project

from .conftest import accuracy


@pytest.fixture(scope="module")
def problem(digits):
    """Three training images sent to the next class, 200 other training images to keep; the model's copy."""
    images = digits.train_set.floats()
    with torch.no_grad():
        predictions = digits.model(images[:3]).argmax(1)
    return images[:3], (predictions + 1) % 10, images[3:203]


@pytest.mark.parametrize(("layer", "norm"), [(0, "inf"), (1, "inf"), (1, "2"), (1, "1")])
def test_targets_hit_and_others_kept(digits, problem, layer, norm):
    images, targets, keep = problem
    before = copy.deepcopy(digits.model.state_dict())
    with torch.no_grad():
        kept_labels = digits.model(keep).argmax(1)
    result = FaultSneakingAttack(digits.model, layer, norm=norm, steps=100, search_steps=6)(images, targets, keep)
    assert result.feasible and result.success.shape == (3,) and result.kept.shape == (200,)
    attacked = result.apply(digits.model)
    with torch.no_grad():
        assert torch.equal(attacked(images).argmax(1), targets)
        assert torch.equal(attacked(keep).argmax(1), kept_labels)
    for key, value in digits.model.state_dict().items():  # the attacked model is a copy
        assert torch.equal(value, before[key])
    # The reported norms are those of the change actually applied to the layer, and it fits the ball.
    name = ("hidden.0", "head")[layer]
    change = (attacked.state_dict()[f"{name}.weight"] - before[f"{name}.weight"]).flatten()
    assert result.layer == name and result.bias is None
    assert torch.equal(attacked.state_dict()[f"{name}.bias"], before[f"{name}.bias"])
    assert result.linf == pytest.approx(float(change.abs().max()), rel=1e-4)
    assert result.l2 == pytest.approx(float(change.norm()), rel=1e-4)
    assert abs(result.l0 - int((change != 0).sum())) <= 0.01 * change.numel()  # float rounding of tiny entries
    reported = {"inf": result.linf, "2": result.l2, "1": float(result.weight.abs().sum())}[norm]
    assert 0 < reported <= result.radius * (1 + 1e-5)
    # A stealthy attack: the test accuracy barely moves (the kept images hold the decision surface).
    assert accuracy(attacked, digits.images, digits.labels) >= accuracy(digits.model, digits.images, digits.labels) - 0.1


def test_l1_ball_gives_sparser_changes_than_linf(digits, problem):
    images, targets, keep = problem
    linf = FaultSneakingAttack(digits.model, 1, norm="inf", search_steps=4)(images, targets, keep)
    l1 = FaultSneakingAttack(digits.model, 1, norm="1", search_steps=4)(images, targets, keep)
    assert l1.feasible and linf.feasible
    assert l1.l0 < linf.l0


def test_bias_is_perturbed_when_asked(digits, problem):
    images, targets, keep = problem
    result = FaultSneakingAttack(digits.model, 1, bias=True, search_steps=4)(images, targets, keep)
    assert result.feasible and result.bias is not None and result.bias.shape == (10,)
    delta = torch.cat([result.weight.flatten(), result.bias])
    assert result.linf == pytest.approx(float(delta.abs().max()))
    attacked = result.apply(digits.model)
    assert torch.allclose(attacked.head.bias, digits.model.head.bias + result.bias)


def test_keeping_the_own_targets_costs_nothing(digits, problem):
    images, _, keep = problem
    with torch.no_grad():
        own = digits.model(images).argmax(1)
    result = FaultSneakingAttack(digits.model, 0)(images, own, keep)
    assert result.feasible and result.linf == 0 and result.l0 == 0


def test_l1_projection_matches_hand_computation():
    delta = torch.tensor([3.0, -1.0, 0.5])
    assert torch.equal(_project(delta, "1", 2.0), torch.tensor([2.0, -0.0, 0.0]))
    assert torch.allclose(_project(torch.tensor([1.0, -1.0, 1.0]), "1", 1.5), torch.tensor([0.5, -0.5, 0.5]))
    assert torch.equal(_project(delta, "1", 10.0), delta)
    assert torch.allclose(_project(delta, "2", 1.0).norm(), torch.tensor(1.0))
    assert torch.equal(_project(delta, "inf", 1.0), torch.tensor([1.0, -1.0, 0.5]))


def test_validation(digits, problem):
    images, targets, keep = problem
    with pytest.raises(ValueError, match=r"layer must be an integer in 0\.\.1"):
        FaultSneakingAttack(digits.model, 2)
    with pytest.raises(ValueError, match="norm must be one of"):
        FaultSneakingAttack(digits.model, 0, norm="l2")
    with pytest.raises(ValueError, match="kappa must be >= 0"):
        FaultSneakingAttack(digits.model, 0, kappa=-1.0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10, bias=False))
    with pytest.raises(ValueError, match="has no bias"):
        FaultSneakingAttack(model, 0, bias=True)
    attack = FaultSneakingAttack(digits.model, 0)
    with pytest.raises(ValueError, match="labels must be in 0..9"):
        attack(images, targets + 10, keep)
    with pytest.raises(ValueError, match="x must lie in"):
        attack(images * 2, targets, keep)
    assert repr(attack).startswith("FaultSneakingAttack(layer=0, norm='inf', bias=False")
