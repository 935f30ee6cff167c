"""The fault sneaking attack (Zhao et al. 2019) on the digits MLP: targets hit, others kept, norms honest."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

from qrobust.attacks import FaultSneakingAttack, FaultSneakingResult
from qrobust.attacks.fault_sneaking import _project
from qrobust.models import build_model
from qrobust.train import TrainConfig, train

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
    result = FaultSneakingAttack(digits.model, layer, norm=norm, steps=60, search_steps=4)(images, targets, keep)
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
    assert (
        accuracy(attacked, digits.images, digits.labels) >= accuracy(digits.model, digits.images, digits.labels) - 0.1
    )


def test_l1_ball_gives_sparser_changes_than_linf(digits, problem):
    images, targets, keep = problem
    linf = FaultSneakingAttack(digits.model, 1, norm="inf", steps=60, search_steps=3)(images, targets, keep)
    l1 = FaultSneakingAttack(digits.model, 1, norm="1", steps=60, search_steps=3)(images, targets, keep)
    assert l1.feasible and linf.feasible
    assert l1.l0 < linf.l0


def test_bias_is_perturbed_when_asked(digits, problem):
    images, targets, keep = problem
    result = FaultSneakingAttack(digits.model, 1, bias=True, steps=60, search_steps=2)(images, targets, keep)
    assert result.feasible and result.bias is not None and result.bias.shape == (10,)
    delta = torch.cat([result.weight.flatten(), result.bias])
    assert result.linf == pytest.approx(float(delta.abs().max()))
    attacked = result.apply(digits.model)
    assert torch.allclose(attacked.head.bias, digits.model.head.bias + result.bias)


def test_deep_mlp_last_layers_with_keep_fraction(digits):
    """A 5-layer MLP on digits, attacked at its last two layers: every target hit and at least 90% of the
    kept images kept, checked on the perturbed copy (the deep case of Weng et al.'s Table 1)."""
    torch.manual_seed(0)
    model = build_model("mlp", digits.train_set.info, depth=5, width=32)
    train(model, digits.train_set, TrainConfig(epochs=8, batch_size=32, lr=0.05, seed=0), progress=False)
    model.eval()
    images = digits.train_set.floats()[:103]
    with torch.no_grad():
        predictions = model(images).argmax(1)
    targets = (predictions[:3] + 1) % 10
    for layer in (3, 4):
        attack = FaultSneakingAttack(model, layer, steps=100, search_steps=2, keep_fraction=0.9)
        result = attack(images[:3], targets, images[3:])
        assert result.feasible and result.keep_fraction == 0.9 and result.linf <= result.radius * (1 + 1e-5)
        with torch.no_grad():
            attacked = result.apply(model)(images).argmax(1)
        assert torch.equal(attacked[:3], targets)
        assert torch.equal(attacked[3:] == predictions[3:], result.kept) and result.kept.float().mean() >= 0.9


def test_impossible_attack_reports_its_closest_attempt(digits, problem):
    """Keeping the target images themselves at their own labels cannot be done: the result says so
    (radius inf, not feasible) but carries a real attempt that hits every target (each is a target twice,
    so its two constraints outweigh its kept copy), inside the last ball."""
    images, targets, keep = problem
    attack = FaultSneakingAttack(digits.model, 1, steps=30)
    result = attack(images.repeat(2, 1, 1, 1), targets.repeat(2), torch.cat([images, keep]))
    assert result.radius == float("inf") and not result.feasible
    assert result.success.all() and not result.kept[:3].any() and result.kept[3:].float().mean() >= 0.9
    assert 0 < result.linf <= 0.01 * 2**15 * (1 + 1e-5)
    with torch.no_grad():
        assert torch.equal(result.apply(digits.model)(images).argmax(1), targets)


def test_replayed_prefix_gives_the_perturbed_models_logits():
    """The attack recomputes only the modules after the attacked layer; a module that also runs after it
    (the shared ReLU here) is recomputed too. Its logits must equal those of the perturbed copy."""
    torch.manual_seed(0)
    relu = nn.ReLU()
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), relu, nn.Linear(16, 16), relu, nn.Linear(16, 10)).eval()
    images = torch.rand(5, 1, 8, 8)
    attack = FaultSneakingAttack(model, 1, bias=True)
    delta = torch.randn(16 * 16 + 16)
    weight, bias = attack._split(delta)
    flags = torch.ones(1, dtype=torch.bool)
    result = FaultSneakingResult("3", weight, bias, 1.0, 1.0, 1.0, 1, flags, flags)
    with torch.no_grad():
        assert torch.allclose(attack._forward(images)(delta), result.apply(model)(images), atol=1e-5)
        assert torch.allclose(attack._forward(images)(torch.zeros_like(delta)), model(images), atol=1e-6)


def test_keep_fraction_decides_feasibility(digits, problem):
    images, targets, keep = problem
    result = FaultSneakingAttack(digits.model, 1, steps=30, search_steps=1)(images, targets, keep)
    flipped = result.kept.clone()
    flipped[:3] = False  # 197 of 200 kept
    loose = dataclasses.replace(result, kept=flipped, keep_fraction=0.98)
    assert loose.feasible and not dataclasses.replace(loose, keep_fraction=0.99).feasible


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
    with pytest.raises(ValueError, match="penalty_growth must be >= 1"):
        FaultSneakingAttack(digits.model, 0, penalty_growth=0.5)
    with pytest.raises(ValueError, match=r"keep_fraction must be in \(0, 1\]"):
        FaultSneakingAttack(digits.model, 0, keep_fraction=1.5)
    with pytest.raises(ValueError, match="keep_fraction must be > 0"):
        FaultSneakingAttack(digits.model, 0, keep_fraction=0.0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10, bias=False))
    with pytest.raises(ValueError, match="has no bias"):
        FaultSneakingAttack(model, 0, bias=True)
    attack = FaultSneakingAttack(digits.model, 0)
    with pytest.raises(ValueError, match=r"labels must be in 0\.\.9"):
        attack(images, targets + 10, keep)
    with pytest.raises(ValueError, match="x must lie in"):
        attack(images * 2, targets, keep)
    assert repr(attack).startswith("FaultSneakingAttack(layer=0, norm='inf', bias=False")
