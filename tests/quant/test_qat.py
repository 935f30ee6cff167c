"""Tests for qrobust.quant.qat: fake quantization against the float model, folding, calibration, conversion."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qrobust.data.base import LatticeDataset
from qrobust.models import build_model, model_names
from qrobust.quant import QuantConfig, calibrate, convert, prepare_qat
from qrobust.quant.numerics import pad_channels, round_half_up
from qrobust.quant.qat import ActQuant, QConv2d, QLinear
from qrobust.train.loop import TrainConfig, train

from .conftest import SHAPES, lattice_images, make_info


def floats(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 255


@pytest.mark.parametrize("name", model_names())
def test_qat_forward_is_close_to_float_forward(name: str, quantized) -> None:
    q = quantized(name)
    with torch.no_grad():
        fake, real = q.qat(floats(q.images)), q.model(floats(q.images))
    # 8-bit noise against logits centred over the data (so small): 2% (mlp) to 21% (resnet110) here;
    # a wrong fold or a lost layer gives errors of order 1.
    assert float((fake - real).norm() / real.norm()) < 0.3


@pytest.mark.parametrize("name", model_names())
def test_every_converted_op_reproduces_its_qat_step(name: str, quantized) -> None:
    """Each integer op, fed the QAT model's own (lattice) inputs, gives the QAT step's outputs on the
    integer grid: exactly but for float rounding at grid midpoints (<= 0.1% of values, off by one)."""
    q = quantized(name)
    qparams = q.int8.value_qparams
    values = [q.qat.input_quant(floats(q.images[:64]))]
    with torch.no_grad():
        for step, args in zip(q.qat.steps, q.qat.inputs):
            values.append(step(*(values[i] for i in args)))

    def lattice(index: int) -> torch.Tensor:
        scale, zero_point = qparams[index]
        return round_half_up(values[index].double() / scale) + zero_point

    for index, (op, args) in enumerate(zip(q.int8.ops, q.int8.inputs), start=1):
        out = op(*(lattice(i).to(torch.uint8) for i in args)).double()
        expected = lattice(index) if index < len(q.int8.ops) else values[index].double() / qparams[index][0]
        difference = (out - expected).abs()
        assert float(difference.max()) <= 1.0, f"op {index} ({op.kind})"
        if index < len(q.int8.ops):
            assert float((difference > 0).double().mean()) <= 1e-3, f"op {index} ({op.kind})"


@pytest.mark.parametrize("name", ["mlp", "cnn", "resnet20"])
def test_convert_reproduces_qat_predictions(name: str, quantized) -> None:
    q = quantized(name)
    with torch.no_grad():
        fake = q.qat(floats(q.images))
    logits = q.int8(q.images)
    assert float((logits.argmax(1) == fake.argmax(1)).float().mean()) >= 0.99
    dequantized = logits.double() * q.int8.logit_scale
    assert float((dequantized - fake.double()).abs().max()) <= 0.05 * float(fake.abs().max())


def test_deep_models_convert_to_close_logits(quantized) -> None:
    """Deep random nets amplify single rounding flips (see the per-op test for exactness), yet the
    integer logits stay as close to the QAT ones as the QAT ones are to the float model's."""
    q = quantized("resnet110")
    with torch.no_grad():
        fake, real = q.qat(floats(q.images)), q.model(floats(q.images)).double()
    dequantized = q.int8(q.images).double() * q.int8.logit_scale
    assert float((dequantized - fake.double()).norm()) <= 1.5 * float((fake.double() - real).norm())


def test_batchnorm_folding_is_exact_in_float() -> None:
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(3, 8, 3, padding=1, bias=True), nn.BatchNorm2d(8)
    bn.weight.data, bn.bias.data = torch.rand(8) + 0.5, torch.randn(8)
    bn.running_mean, bn.running_var = torch.randn(8), torch.rand(8) + 0.5
    bn.eval()
    step = QConv2d(copy.deepcopy(conv), copy.deepcopy(bn), False, None, None, None).double()
    weight, bias = step.folded()
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        expected = bn.double()(conv.double()(x))
        got = F.conv2d(x, weight.double(), bias.double(), padding=1)
    assert torch.allclose(got, expected, atol=1e-10)


def test_batchnorm_in_training_uses_batch_statistics_and_updates_running_ones() -> None:
    torch.manual_seed(1)
    conv, bn = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
    quant = ActQuant(0.9)
    step = QConv2d(copy.deepcopy(conv), copy.deepcopy(bn), True, None, ActQuant(0.9), quant)
    step.input_quant.min_val.fill_(-4.0)
    step.input_quant.max_val.fill_(4.0)
    step.train()
    x = torch.randn(16, 3, 6, 6)
    with torch.no_grad():
        out = step(x)
        expected = F.relu(bn.train()(conv(x)))  # float conv + BN with batch statistics
    assert float((out - expected).abs().max()) < 0.05 * float(expected.abs().max())
    assert torch.allclose(step.bn.running_mean, bn.running_mean, atol=0.02)
    assert quant.observed and float(quant.min_val) == 0.0


def test_normalize_folding_with_mean_padding() -> None:
    """Zero padding after Normalize equals padding the raw image with the channel mean; rounding that
    mean to the lattice changes border outputs by at most sum|W'| * 0.5/255, interior ones not at all."""
    torch.manual_seed(2)
    mean, std = torch.tensor([0.31, 0.52, 0.77]), torch.tensor([0.2, 0.25, 0.3])
    conv = nn.Conv2d(3, 4, 3, padding=1)
    step = QConv2d(copy.deepcopy(conv), None, False, (mean, std), None, None)
    weight, bias = step.folded()
    x = torch.rand(2, 3, 7, 7)
    with torch.no_grad():
        expected = conv((x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1))
        exact = F.conv2d(pad_channels(x, (1, 1), mean), weight, bias)
        lattice = F.conv2d(pad_channels(x, (1, 1), round_half_up(255 * mean) / 255), weight, bias)
    assert torch.allclose(exact, expected, atol=1e-5)
    assert torch.allclose(lattice[:, :, 1:-1, 1:-1], expected[:, :, 1:-1, 1:-1], atol=1e-5)
    bound = weight.abs().sum((1, 2, 3)).view(1, 4, 1, 1) * 0.5 / 255
    assert bool(((lattice - expected).abs() <= bound + 1e-5).all())
    assert float((lattice - expected).abs().max()) > 0  # the border really differs a little


@pytest.mark.parametrize("name", ["mlp", "cnn", "resnet20"])
def test_normalize_is_folded_into_the_first_layer(name: str, quantized) -> None:
    q = quantized(name)
    index = 1 if isinstance(q.qat.steps[0], nn.Flatten) else 0  # the MLP flattens the image first
    first, op = q.qat.steps[index], q.int8.ops[index]
    assert isinstance(first, (QConv2d, QLinear)) and first.input_mean is not None
    assert op.in_zero_point == 0  # reads the uint8 image directly
    if op.kind == "conv":
        expected = round_half_up(255 * torch.tensor(make_info(SHAPES[name]).mean)).to(torch.uint8)
        assert torch.equal(op.pad_value, expected)


def test_input_quantizer_clips_to_the_unit_interval_and_rounds_to_the_lattice(quantized) -> None:
    q = quantized("cnn")
    noisy = floats(q.images[:32]) + 0.5 * torch.randn(32, *SHAPES["cnn"], generator=torch.Generator().manual_seed(0))
    on_lattice = round_half_up(noisy.clamp(0, 1) * 255) / 255
    with torch.no_grad():
        assert torch.equal(q.qat(noisy), q.qat(on_lattice))
        deployed = q.int8(round_half_up(noisy.clamp(0, 1) * 255).to(torch.uint8))
        assert float((q.qat(on_lattice).argmax(1) == deployed.argmax(1)).float().mean()) >= 0.95


def test_qat_model_trains_with_the_existing_loop_under_noise() -> None:
    info = make_info((1, 8, 8), num_classes=3)
    images = lattice_images(96, info.shape, seed=5)
    labels = torch.arange(96) % 3
    torch.manual_seed(0)
    qat = prepare_qat(build_model("cnn", info))
    before = copy.deepcopy(qat.state_dict())
    config = TrainConfig(epochs=2, batch_size=32, lr=0.01, sigma=0.25)
    history = train(qat, LatticeDataset(images, labels, info), config, progress=False)
    assert len(history) == 2 and all(torch.isfinite(torch.tensor(h.loss)) for h in history)
    assert not torch.equal(before["steps.0.conv.weight"], qat.state_dict()["steps.0.conv.weight"])
    quants = [m for m in qat.modules() if isinstance(m, ActQuant)]
    assert quants and all(quant.observed for quant in quants)
    assert convert(qat)(images[:8]).dtype == torch.int32


def test_calibrate_sets_min_max_ranges_from_uint8_or_float_images(quantized) -> None:
    q = quantized("mlp")
    qat = copy.deepcopy(q.qat)
    images = lattice_images(64, SHAPES["mlp"], seed=6)
    calibrate(qat, images, batch_size=16)
    first = qat.steps[1].out_quant
    with torch.no_grad():
        hidden = qat.steps[1](qat.steps[0](qat.input_quant(floats(images))))
    assert float(first.max_val) == pytest.approx(float(hidden.max()), rel=0.02)
    assert qat.training == q.qat.training  # the mode is restored
    ranges = [(float(m.min_val), float(m.max_val)) for m in qat.modules() if isinstance(m, ActQuant)]
    calibrate(qat, floats(images))
    assert ranges == [(float(m.min_val), float(m.max_val)) for m in qat.modules() if isinstance(m, ActQuant)]


@pytest.mark.parametrize(
    "images, batch_size, message",
    [
        (torch.zeros(4, 1, 28, 28, dtype=torch.int32), 8, "images must be uint8 or float"),
        (torch.zeros(1, 28, 28), 8, "images must be uint8 or float"),
        (torch.zeros(4, 1, 28, 28), 0, "batch_size must be an integer >= 1"),
    ],
)
def test_calibrate_rejects_bad_arguments(images, batch_size, message, quantized) -> None:
    with pytest.raises(ValueError, match=message):
        calibrate(quantized("mlp").qat, images, batch_size=batch_size)
    with pytest.raises(ValueError, match="made by prepare_qat"):
        calibrate(quantized("mlp").model, images)


def test_convert_needs_observed_ranges() -> None:
    qat = prepare_qat(build_model("mlp", make_info((1, 4, 4))))
    with pytest.raises(RuntimeError, match="calibrate or train"):
        convert(qat)
    with pytest.raises(ValueError, match="made by prepare_qat"):
        convert(build_model("mlp", make_info((1, 4, 4))))


@pytest.mark.parametrize("decay", [-0.1, 1.0, "0.9"])
def test_quant_config_validates(decay) -> None:
    with pytest.raises(ValueError, match="ema_decay must be in"):
        QuantConfig(ema_decay=decay)
