"""robust_accuracy and evaluate_attacks: natural, white-box and transfer accuracy."""

from __future__ import annotations

import warnings

import pytest
import torch

from qrobust.attacks import FGSM, PGD, GradientMaskingWarning, LatticeInputs, evaluate_attacks, robust_accuracy

from .conftest import accuracy


def test_natural_accuracy_is_plain_accuracy_on_floats_or_lattice_images(digits):
    expected = accuracy(digits.model, digits.images, digits.labels)
    lattice = (digits.images * 255).round().to(torch.uint8)
    assert robust_accuracy(digits.model, None, digits.images, digits.labels) == pytest.approx(expected)
    assert robust_accuracy(digits.model, None, lattice, digits.labels, batch_size=7) == pytest.approx(expected)


def test_evaluate_attacks_reports_every_attack_in_order(digits):
    model, x, y = digits.model, digits.images, digits.labels
    attacks = {
        "natural": None,
        "fgsm": FGSM(model, 0.1),
        "ifgsm": PGD(model, eps=0.1, step_size=0.01, steps=20, random_start=False),
    }
    results = evaluate_attacks({"digits": model}, attacks, x, y, batch_size=64, progress=True)["digits"]
    assert list(results) == list(attacks)
    assert results["natural"] > results["fgsm"] >= results["ifgsm"]
    for name in ("fgsm", "ifgsm"):  # the attacks are deterministic and per-example, so batching is irrelevant
        assert results[name] == pytest.approx(robust_accuracy(model, attacks[name], x, y, batch_size=200), abs=0.01)


def test_the_evaluated_model_gets_its_mode_back(digits):
    digits.model.train()
    try:
        robust_accuracy(digits.model, FGSM(digits.model, 0.1), digits.images[:32], digits.labels[:32])
        assert all(module.training for module in digits.model.modules())
    finally:
        digits.model.eval()


def test_white_box_pgd_works_through_the_qat_straight_through_gradients(digits, digits_quantized):
    qat, x, y = digits_quantized.qat, digits.images, digits.labels
    attack = PGD(qat, eps=0.15, step_size=0.015, steps=20, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientMaskingWarning)  # the STE gives real gradients
        results = evaluate_attacks({"qat": qat}, {"natural": None, "pgd": attack}, x, y)["qat"]
    assert results["natural"] > 0.9 and results["pgd"] < 0.5 * results["natural"]


def test_examples_crafted_on_the_qat_twin_transfer_to_the_int8_model(digits, digits_quantized):
    qat, int8 = digits_quantized.qat, LatticeInputs(digits_quantized.int8)
    x, y = digits.images, digits.labels
    attack = PGD(qat, eps=0.15, step_size=0.015, steps=20, generator=torch.Generator().manual_seed(0))
    natural = robust_accuracy(int8, None, x, y)
    transferred = robust_accuracy(int8, attack, x, y)
    white_box = robust_accuracy(qat, attack, x, y)
    assert natural > 0.9 and transferred < 0.5 * natural
    assert transferred == pytest.approx(white_box, abs=0.05)  # the twin computes what the int8 model does


@pytest.mark.parametrize(
    ("images", "labels", "options", "message"),
    [
        (torch.rand(8, 64), torch.zeros(8, dtype=torch.long), {}, r"non-empty batch of shape \(N, C, H, W\)"),
        (torch.rand(0, 1, 8, 8), torch.zeros(0, dtype=torch.long), {}, "images must be a non-empty batch"),
        (torch.rand(8, 1, 8, 8), torch.zeros(8), {}, r"labels must be int64 of shape \(8,\), got torch.float32"),
        (torch.rand(8, 1, 8, 8), torch.zeros(7, dtype=torch.long), {}, r"labels must be int64 of shape \(8,\)"),
        (torch.rand(8, 1, 8, 8), torch.zeros(8, dtype=torch.long), {"batch_size": 0}, "batch_size must be an integer"),
    ],
)
def test_bad_arguments_raise(images, labels, options, message, digits):
    with pytest.raises(ValueError, match=message):
        robust_accuracy(digits.model, None, images, labels, **options)


def test_attacks_must_be_attacks(digits):
    with pytest.raises(ValueError, match="attack 'pgd' must be an Attack or None, got function"):
        evaluate_attacks({"mlp": digits.model}, {"pgd": lambda x, y: x}, digits.images, digits.labels)
