"""Tests for qrobust.quant.qat: fake quantization against the float model, folding, calibration, conversion."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qrobust.data.base import LatticeDataset
from qrobust.models import build_model
from qrobust.quant import QuantConfig, calibrate, convert, prepare_qat
from qrobust.quant.numerics import input_grid, pad_channels, round_half_up
from qrobust.quant.qat import ActQuant, InputQuant, QConv2d, QLinear
from qrobust.train.loop import TrainConfig, train

from .conftest import QUANTIZABLE, SHAPES, intrs_noisy, lattice_images, make_info


def floats(images: torch.Tensor) -> torch.Tensor:
    """The float view v / 255 of integer lattice values, unclipped."""
    return images.float() / 255


def inputs(q, margin: int) -> torch.Tensor:
    """The lattice values a model of ``margin`` is for: the test images, with IntRS noise at sigma = 0.5
    (unclipped int16) when the model has an input margin."""
    return intrs_noisy(q.images, 0.5, seed=5) if margin else q.images


@pytest.mark.parametrize("name", QUANTIZABLE)
def test_qat_forward_is_close_to_float_forward(name: str, quantized) -> None:
    q = quantized(name)
    with torch.no_grad():
        fake, real = q.qat(floats(q.images)), q.model(floats(q.images))
    # 8-bit noise against logits centred over the data (so small): 2% (mlp) to 21% (resnet110) here;
    # a wrong fold or a lost layer gives errors of order 1.
    assert float((fake - real).norm() / real.norm()) < 0.3


@pytest.mark.parametrize("name, margin", [(name, 0) for name in QUANTIZABLE] + [("cnn", 255)])
def test_every_converted_op_reproduces_its_qat_step(name: str, margin: int, quantized) -> None:
    """Each integer op, fed the QAT model's own (lattice) inputs, gives the QAT step's outputs on the
    integer grid: exactly but for float rounding at grid midpoints (<= 0.1% of values, off by one)."""
    q = quantized(name, margin=margin)
    qparams = q.int8.value_qparams
    values = [q.qat.input_quant(floats(inputs(q, margin)[:64]))]
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


@pytest.mark.parametrize("name, margin", [("mlp", 0), ("cnn", 0), ("resnet20", 0), ("cnn", 255), ("resnet20", 383)])
def test_convert_reproduces_qat_predictions(name: str, margin: int, quantized) -> None:
    """With a margin, on unclipped IntRS inputs: the QAT model reads v / 255, the int8 model v itself."""
    q = quantized(name, margin=margin)
    images = inputs(q, margin)
    with torch.no_grad():
        fake = q.qat(floats(images))
    logits = q.int8(images)
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


@pytest.mark.parametrize("margin", [0, 255])
def test_normalize_folding_with_mean_padding(margin: int) -> None:
    """Zero padding after Normalize equals padding the raw image with the channel mean; rounding that
    mean to the input grid (step/255) changes border outputs by at most sum|W'| * step/2 / 255, interior
    ones not at all."""
    torch.manual_seed(2)
    mean, std = torch.tensor([0.31, 0.52, 0.77]), torch.tensor([0.2, 0.25, 0.3])
    conv = nn.Conv2d(3, 4, 3, padding=1)
    step = QConv2d(copy.deepcopy(conv), None, False, (mean, std), InputQuant(margin), None)
    weight, bias = step.folded()
    grid = input_grid(margin)[0]
    assert torch.equal(step.pad_value, round_half_up(255 * mean / grid) * grid / 255)
    x = torch.rand(2, 3, 7, 7)
    with torch.no_grad():
        expected = conv((x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1))
        exact = F.conv2d(pad_channels(x, (1, 1), mean), weight, bias)
        lattice = F.conv2d(pad_channels(x, (1, 1), step.pad_value), weight, bias)
    assert torch.allclose(exact, expected, atol=1e-5)
    assert torch.allclose(lattice[:, :, 1:-1, 1:-1], expected[:, :, 1:-1, 1:-1], atol=1e-5)
    bound = weight.abs().sum((1, 2, 3)).view(1, 4, 1, 1) * (grid / 2) / 255
    assert bool(((lattice - expected).abs() <= bound + 1e-5).all())
    assert float((lattice - expected).abs().max()) > 0  # the border really differs a little


@pytest.mark.parametrize("name, margin", [("mlp", 0), ("cnn", 0), ("resnet20", 0), ("cnn", 255), ("resnet20", 383)])
def test_normalize_is_folded_into_the_first_layer(name: str, margin: int, quantized) -> None:
    q = quantized(name, margin=margin)
    step, zero_point = input_grid(margin)
    index = 1 if isinstance(q.qat.steps[0], nn.Flatten) else 0  # the MLP flattens the image first
    first, op = q.qat.steps[index], q.int8.ops[index]
    assert isinstance(first, (QConv2d, QLinear)) and first.input_mean is not None
    assert op.in_zero_point == zero_point  # reads the input codes directly (the uint8 image without a margin)
    if op.kind == "conv":
        mean = torch.tensor(make_info(SHAPES[name]).mean)
        assert torch.equal(op.pad_value, (round_half_up(255 * mean / step) + zero_point).to(torch.uint8))


def test_input_quantizer_clips_to_the_unit_interval_and_rounds_to_the_lattice(quantized) -> None:
    q = quantized("cnn")
    noisy = floats(q.images[:32]) + 0.5 * torch.randn(32, *SHAPES["cnn"], generator=torch.Generator().manual_seed(0))
    on_lattice = round_half_up(noisy.clamp(0, 1) * 255) / 255
    with torch.no_grad():
        assert torch.equal(q.qat(noisy), q.qat(on_lattice))
        deployed = q.int8(round_half_up(noisy.clamp(0, 1) * 255).to(torch.uint8))
        assert float((q.qat(on_lattice).argmax(1) == deployed.argmax(1)).float().mean()) >= 0.95


@pytest.mark.parametrize("margin", [0, 255])
def test_input_quantizer_rounds_lattice_values_exactly_as_the_engine(margin: int, quantized) -> None:
    """QAT's float fake quantization of v / 255 lands on the code the integer engine computes from v:
    the odd step leaves no ties for float error to break the other way."""
    q = quantized("cnn", margin=margin)
    step, zero_point = input_grid(margin)
    v = intrs_noisy(q.images, 0.5, seed=6)  # (N, C, H, W) int16, unclipped
    codes = q.int8.input_codes(v).double()
    with torch.no_grad():
        fake = q.qat.input_quant(floats(v)).double()
    assert float((fake - (codes - zero_point) * step / 255).abs().max()) < 1e-6
    if margin:
        inside = (v >= -margin) & (v <= 255 + margin)
        assert float(inside.float().mean()) > 0.98  # at sigma = 0.5 a margin of 255 = 2 sigma_int keeps almost all
        assert int(((codes - zero_point) * step - v)[inside].abs().max()) <= step // 2


@pytest.mark.parametrize("margin", [0, 255])
@pytest.mark.filterwarnings("ignore:epochs 1-2.*chance level")  # random labels: nothing to learn, and it says so
def test_qat_model_trains_with_the_existing_loop_under_noise(margin: int) -> None:
    info = make_info((1, 8, 8), num_classes=3)
    images = lattice_images(96, info.shape, seed=5)
    labels = torch.arange(96) % 3
    torch.manual_seed(0)
    qat = prepare_qat(build_model("cnn", info), QuantConfig(input_margin=margin))
    before = copy.deepcopy(qat.state_dict())
    config = TrainConfig(epochs=2, batch_size=32, lr=0.01, sigma=0.25)
    history = train(qat, LatticeDataset(images, labels, info), config, progress=False)
    assert len(history) == 2 and all(torch.isfinite(torch.tensor(h.loss)) for h in history)
    assert not torch.equal(before["steps.0.conv.weight"], qat.state_dict()["steps.0.conv.weight"])
    quants = [m for m in qat.modules() if isinstance(m, ActQuant)]
    assert quants and all(quant.observed for quant in quants)
    int8 = convert(qat)
    assert int8.input_margin == margin and int8(images[:8]).dtype == torch.int32


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
    noisy = intrs_noisy(images, 0.5, seed=7)  # int16 lattice values read as v / 255, like floats
    calibrate(qat, noisy)
    ranges = [(float(m.min_val), float(m.max_val)) for m in qat.modules() if isinstance(m, ActQuant)]
    calibrate(qat, floats(noisy))
    assert ranges == [(float(m.min_val), float(m.max_val)) for m in qat.modules() if isinstance(m, ActQuant)]


@pytest.mark.parametrize(
    "images, batch_size, message",
    [
        (torch.zeros(4, 1, 28, 28, dtype=torch.bool), 8, "images must be integer lattice values or float"),
        (torch.zeros(1, 28, 28), 8, "images must be integer lattice values or float"),
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


@pytest.mark.parametrize("margin", [-1, 2.5, None])
def test_quant_config_validates_the_input_margin(margin) -> None:
    with pytest.raises(ValueError, match="input_margin must be an int"):
        QuantConfig(input_margin=margin)
    assert QuantConfig().input_margin == 0
