"""What every attack must do: check its inputs, leave the model as it was, warn about masked gradients."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from qrobust.attacks import FGSM, PGD, CarliniWagnerL2, GradientMaskingWarning

from .conftest import ATTACKS, RoundsInput


@pytest.mark.parametrize("name", ATTACKS)
def test_output_is_a_detached_image_batch_in_the_unit_interval(name, digits):
    x, y = digits.images[:64], digits.labels[:64]
    x_adv = ATTACKS[name](digits.model)(x, y)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert not x_adv.requires_grad
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert not torch.equal(x_adv, x)  # it did something


@pytest.mark.parametrize("name", ATTACKS)
def test_model_mode_and_parameter_gradients_are_left_alone(name, digits):
    model = digits.model
    model.train()
    model.hidden[0].eval()  # a mixed state must come back as it was, module by module
    modes = [module.training for module in model.modules()]
    grads = [torch.full_like(p, 0.5) for p in model.parameters()]
    for parameter, grad in zip(model.parameters(), grads):
        parameter.grad = grad.clone()
    try:
        ATTACKS[name](model)(digits.images[:16], digits.labels[:16])
        assert [module.training for module in model.modules()] == modes
        assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    finally:
        model.eval()
        for parameter in model.parameters():
            parameter.grad = None


def test_the_model_runs_in_evaluation_mode_during_the_attack(digits):
    seen = []
    model = nn.Sequential(digits.model)
    model.register_forward_pre_hook(lambda module, args: seen.append(module.training))
    model.train()
    try:
        PGD(model, eps=0.1, step_size=0.05, steps=2)(digits.images[:4], digits.labels[:4])
        assert seen == [False, False] and model.training and digits.model.training
    finally:
        model.eval()


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_attacks_work_inside_no_grad_and_inference_mode(context, digits):
    x, y = digits.images[:32], digits.labels[:32]
    expected = FGSM(digits.model, 0.1)(x, y)
    with context():
        x_inference = digits.images[:32].clone()  # an inference tensor under inference_mode
        assert torch.equal(FGSM(digits.model, 0.1)(x_inference, y), expected)


@pytest.mark.parametrize("name", ATTACKS)
def test_masked_gradients_warn_once(name, digits):
    attack = ATTACKS[name](RoundsInput(digits.model))
    with pytest.warns(GradientMaskingWarning, match="exactly zero for 100% of the batch") as record:
        attack(digits.images[:32], digits.labels[:32])
        attack(digits.images[32:64], digits.labels[32:64])
    assert len([w for w in record if w.category is GradientMaskingWarning]) == 1


@pytest.mark.parametrize("name", ATTACKS)
def test_ordinary_gradients_do_not_warn(name, digits):
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientMaskingWarning)
        ATTACKS[name](digits.model)(digits.images[:64], digits.labels[:64])


def test_masked_gradients_leave_the_images_unchanged(digits):
    x, y = digits.images[:32], digits.labels[:32]
    attack = PGD(RoundsInput(digits.model), eps=0.1, step_size=0.02, steps=3, random_start=False)
    with pytest.warns(GradientMaskingWarning):
        assert torch.equal(attack(x, y), x)


def test_repr_lists_the_hyperparameters(digits):
    model = digits.model
    assert repr(PGD(model, eps=0.031, step_size=0.007, steps=10)) == (
        "PGD(norm='inf', eps=0.031, step_size=0.007, steps=10, random_start=True, targeted=False)"
    )
    assert repr(FGSM(model, 0.031)) == "FGSM(eps=0.031, targeted=False)"
    assert repr(CarliniWagnerL2(model, steps=50, lr=0.0006)) == (
        "CarliniWagnerL2(lr=0.0006, steps=50, confidence=0.0, initial_c=0.1, search_steps=5, targeted=False)"
    )

    def kl_objective(logits, probabilities):
        return logits.sum()

    assert repr(PGD(model, norm="2", eps=1, step_size=0.5, steps=3, loss=kl_objective)).endswith(
        "targeted=False, loss=kl_objective)"
    )


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda m: PGD(m, norm="l2", eps=0.1, step_size=0.01, steps=1), "norm must be one of 'inf', '2', got 'l2'"),
        (lambda m: PGD(m, eps=-0.1, step_size=0.01, steps=1), "eps must be >= 0, got -0.1"),
        (lambda m: PGD(m, eps=float("nan"), step_size=0.01, steps=1), "eps must be a finite number"),
        (lambda m: PGD(m, eps=0.1, step_size=-1, steps=1), "step_size must be >= 0"),
        (lambda m: PGD(m, eps=0.1, step_size=0.01, steps=0), "steps must be an integer >= 1, got 0"),
        (lambda m: PGD(m, eps=0.1, step_size=0.01, steps=2.5), "steps must be an integer >= 1"),
        (lambda m: PGD(m, eps=0.1, step_size=0.01, steps=1, loss="ce"), "loss must be a callable"),
        (lambda m: FGSM(m, eps="0.1"), "eps must be a finite number, got '0.1'"),
        (lambda m: FGSM(lambda x: x, 0.1), "model must be a torch.nn.Module"),
        (lambda m: CarliniWagnerL2(m, lr=0), "lr must be > 0, got 0"),
        (lambda m: CarliniWagnerL2(m, confidence=-1), "confidence must be >= 0"),
        (lambda m: CarliniWagnerL2(m, initial_c=0), "initial_c must be > 0"),
        (lambda m: CarliniWagnerL2(m, search_steps=0), "search_steps must be an integer >= 1"),
        (lambda m: CarliniWagnerL2(m, steps=True), "steps must be an integer >= 1"),
    ],
)
def test_bad_hyperparameters_raise(make, message, digits):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        make(digits.model)


@pytest.mark.parametrize("name", ATTACKS)
@pytest.mark.parametrize(
    ("x", "y", "message"),
    [
        (torch.rand(4, 64), torch.zeros(4, dtype=torch.long), r"x must be a float tensor of shape \(N, C, H, W\)"),
        (torch.zeros(4, 1, 8, 8, dtype=torch.uint8), torch.zeros(4, dtype=torch.long), "x must be a float tensor"),
        (torch.full((4, 1, 8, 8), float("nan")), torch.zeros(4, dtype=torch.long), "x contains NaN"),
        (torch.full((4, 1, 8, 8), 1.5), torch.zeros(4, dtype=torch.long), r"x must lie in \[0, 1\]"),
        (torch.rand(4, 1, 8, 8), torch.zeros(3, dtype=torch.long), r"y must have one row per image of x \(4\)"),
        (torch.rand(4, 1, 8, 8), torch.zeros(4), "labels must be an int64 tensor of shape"),
        (torch.rand(4, 1, 8, 8), torch.full((4,), 10), r"labels must be in 0..9, got 10..10"),
    ],
)
def test_bad_inputs_raise(name, x, y, message, digits):
    with pytest.raises(ValueError, match=message):
        ATTACKS[name](digits.model)(x, y)


def test_a_custom_loss_must_return_a_scalar(digits):
    attack = PGD(digits.model, eps=0.1, step_size=0.01, steps=1, loss=lambda logits, y: logits)
    with pytest.raises(ValueError, match=r"objective must be a scalar, got shape \(4, 10\)"):
        attack(digits.images[:4], digits.labels[:4])
