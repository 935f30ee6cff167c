"""ExpectationOverNoise (the smoothed soft classifier) and LatticeInputs (int8 models behind floats)."""

from __future__ import annotations

import pytest
import torch
from scipy import stats

from qrobust.attacks import PGD, ExpectationOverNoise, GradientMaskingWarning, LatticeInputs

from .conftest import Linear, accuracy, linear_problem


def _smoothed(model, seed: int = 0, samples: int = 8) -> ExpectationOverNoise:
    return ExpectationOverNoise(model, sigma=0.25, samples=samples, generator=torch.Generator().manual_seed(seed))


def test_expectation_over_noise_returns_log_probabilities(digits):
    log_probs = _smoothed(digits.model)(digits.images[:32])
    assert log_probs.shape == (32, 10)
    assert torch.allclose(log_probs.exp().sum(1), torch.ones(32), atol=1e-5)


def test_expectation_over_noise_is_reproducible_with_a_seeded_generator(digits):
    x = digits.images[:16]
    first, again = _smoothed(digits.model, seed=3), _smoothed(digits.model, seed=3)
    assert torch.equal(first(x), again(x))
    assert not torch.equal(first(x), first(x))  # fresh noise on every call


def test_expectation_over_noise_has_an_input_gradient(digits):
    x = digits.images[:16].clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(_smoothed(digits.model)(x)[torch.arange(16), digits.labels[:16]].sum(), x)
    assert (grad.flatten(1).abs().amax(1) > 0).all()


def test_expectation_over_noise_estimates_the_smoothed_probability_of_a_linear_model():
    """Sharp logits make softmax a vote, whose mean under Gaussian noise is Phi(margin / (sigma ||w1 - w0||))."""
    model, x, _ = linear_problem(num_classes=2, n=20)
    sharp = Linear(1000 * model.weight.detach(), 1000 * model.bias.detach())
    sigma, samples = 0.1, 4000
    smoothed = ExpectationOverNoise(sharp, sigma, samples, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        margin = (model(x)[:, 1] - model(x)[:, 0]).numpy()
        scale = sigma * float((model.weight[1] - model.weight[0]).norm())
        estimate = smoothed(x).exp()[:, 1].numpy()
    exact = stats.norm.cdf(margin / scale)
    assert ((exact > 0.2) & (exact < 0.8)).sum() >= 5  # a real test: many probabilities far from 0 and 1
    tolerance = 4 * (exact * (1 - exact) / samples) ** 0.5 + 1e-3  # 4 binomial standard deviations
    assert (abs(estimate - exact) <= tolerance).all()


def test_pgd_on_the_expectation_attacks_the_smoothed_classifier(digits):
    smoothed = _smoothed(digits.model, samples=16)
    x, y = digits.images[:100], digits.labels[:100]
    attack = PGD(smoothed, norm="2", eps=1.0, step_size=0.25, steps=10, generator=torch.Generator().manual_seed(0))
    x_adv = attack(x, y)
    assert accuracy(smoothed, x_adv, y) < accuracy(smoothed, x, y) - 0.3


@pytest.mark.parametrize(
    ("sigma", "samples", "message"),
    [
        (0.0, 8, "sigma must be > 0, got 0.0"),
        (-1.0, 8, "sigma must be > 0"),
        (0.25, 0, "samples must be an integer >= 1"),
    ],
)
def test_expectation_over_noise_rejects_bad_arguments(sigma, samples, message, digits):
    with pytest.raises(ValueError, match=message):
        ExpectationOverNoise(digits.model, sigma, samples)


def test_lattice_inputs_give_the_int8_logits_in_real_units(digits, digits_quantized):
    int8 = digits_quantized.int8
    images = digits.images[:64]
    lattice = (images * 255).round().to(torch.uint8)
    logits = LatticeInputs(int8)(images)
    assert logits.dtype == torch.float32
    assert torch.equal(logits, int8(lattice).float() * int8.logit_scale)


def test_lattice_inputs_agree_with_the_qat_twin_off_the_lattice(digits, digits_quantized):
    """Off-lattice inputs (here: noisy) round exactly as the QAT input quantizer rounds them."""
    noise = torch.randn(digits.images.shape, generator=torch.Generator().manual_seed(0))
    noisy = (digits.images + 0.02 * noise).clamp(0, 1)
    with torch.no_grad():
        qat, int8 = digits_quantized.qat(noisy), LatticeInputs(digits_quantized.int8)(noisy)
    assert (qat.argmax(1) == int8.argmax(1)).float().mean() >= 0.98
    assert ((qat - int8).norm(dim=1) / qat.norm(dim=1)).median() < 0.05


def test_lattice_inputs_have_no_gradient_and_attacks_on_them_warn(digits, digits_quantized):
    x, y = digits.images[:32], digits.labels[:32]
    with pytest.warns(GradientMaskingWarning, match="LatticeInputs is exactly zero for 100%"):
        x_adv = PGD(LatticeInputs(digits_quantized.int8), eps=0.1, step_size=0.02, steps=3, random_start=False)(x, y)
    assert torch.equal(x_adv, x)


def test_lattice_inputs_take_only_int8_models(digits):
    with pytest.raises(ValueError, match="LatticeInputs takes an Int8Model"):
        LatticeInputs(digits.model)
