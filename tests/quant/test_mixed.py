"""Tests for qrobust.quant.mixed / bitops: BitOPs by hand, the budget rule, grids, KL clips, the quantized
model of every registered model, and mixed-precision checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qrobust.errors import CheckpointError
from qrobust.models import Normalize, build_model, model_names
from qrobust.models.checkpoint import Checkpoint, load_checkpoint, model_metadata, save_checkpoint
from qrobust.models.inference import freeze_for_inference
from qrobust.quant import (
    BitPolicy,
    LayerInfo,
    MixedPrecisionModel,
    QuantConfig,
    bitops,
    bitops_percent,
    calibrate,
    enforce_budget,
    kl_clip,
    layer_infos,
    prepare_qat,
    quantize,
)
from qrobust.train import load_model

from .conftest import SHAPES, center_logits, fit_batchnorm, lattice_images, make_info


def small_net() -> nn.Sequential:
    """Normalize, conv 1->4 (3x3, 8x8), depthwise 3x3 stride 2 (-> 4x4), 1x1 conv 4->8, linear 128->10."""
    return nn.Sequential(
        Normalize([0.3], [0.2]),
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=4, bias=False),
        nn.ReLU(),
        nn.Conv2d(4, 8, 1),
        nn.Flatten(),
        nn.Linear(128, 10),
    )


def test_layer_infos_and_bitops_match_a_hand_computation() -> None:
    layers = layer_infos(small_net(), (1, 8, 8))
    assert [(layer.name, layer.kind, layer.depthwise) for layer in layers] == [
        ("1", "conv", False),
        ("3", "conv", True),
        ("5", "conv", False),
        ("7", "linear", False),
    ]
    sizes = [(layer.in_size, layer.out_size, layer.stride) for layer in layers]
    assert sizes == [(8, 8, 1), (8, 4, 2), (4, 4, 1), (1, 1, 1)]
    assert [layer.params for layer in layers] == [1 * 4 * 9 + 4, 4 * 9, 4 * 8 + 8, 128 * 10 + 10]
    # MACs = weights per filter * filters * output positions (= |k| w h / s^2 of the paper for "same" padding):
    #   conv 1->4 3x3 on 8x8:        (1*9) * 4 * 64 = 2304
    #   depthwise 4, 3x3 s2, 8 -> 4: (1*9) * 4 * 16 =  576   (paper: 9 * 4 * 8*8 / 2^2 = 576)
    #   1x1 conv 4->8 on 4x4:        (4*1) * 8 * 16 =  512
    #   linear 128->10:              128 * 10       = 1280
    assert [layer.macs for layer in layers] == [2304, 576, 512, 1280]
    policy = BitPolicy(weight_bits=(8, 4, 3, 8), act_bits=(8, 2, 5, 8))
    assert bitops(layers, policy) == [8 * 8 * 2304, 4 * 2 * 576, 3 * 5 * 512, 8 * 8 * 1280]  # 147456, 4608, 7680, 81920
    fp32 = 32 * 32 * (2304 + 576 + 512 + 1280)  # 4784128
    assert bitops_percent(layers, policy) == pytest.approx(100 * (147456 + 4608 + 7680 + 81920) / fp32)  # 5.0514%
    assert bitops_percent(layers, BitPolicy.uniform(4, 8)) == pytest.approx(100 * 64 / 1024)


def test_layer_infos_refuses_shared_and_grouped_layers() -> None:
    shared = nn.Linear(4, 4)
    with pytest.raises(ValueError, match="more than once"):
        layer_infos(nn.Sequential(nn.Flatten(), shared, shared), (1, 2, 2))
    with pytest.raises(ValueError, match="2 groups"):
        layer_infos(nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Flatten()), (4, 5, 5))
    with pytest.raises(ValueError, match="input_shape"):
        layer_infos(small_net(), (8, 8))


def random_layers(rng: np.random.Generator, count: int) -> list[LayerInfo]:
    """Synthetic layers with MAC counts spread over three orders of magnitude."""
    layers = []
    for index in range(count):
        channels, size = int(rng.integers(1, 64)), int(rng.integers(1, 16))
        params = channels * channels * 9
        layers.append(LayerInfo(index, str(index), "conv", channels, channels, 3, 1, size, size, params, False))
    return layers


def test_enforce_budget_never_leaves_a_policy_over_budget_and_lowers_back_to_front() -> None:
    rng = np.random.default_rng(0)
    checked = refused = 0
    for _ in range(300):
        count = int(rng.integers(3, 12))
        layers = random_layers(rng, count)
        weight = [8, *rng.integers(2, 9, count - 2).tolist(), 8]
        act = [8, *rng.integers(2, 9, count - 2).tolist(), 8]
        policy = BitPolicy(tuple(weight), tuple(act))
        budget = float(rng.uniform(0.2, 1.2) * bitops_percent(layers, policy))
        try:
            result = enforce_budget(layers, policy, budget)
        except ValueError as error:
            assert "out of reach" in str(error)
            assert bitops_percent(layers, BitPolicy.uniform(count, 2)) > budget
            refused += 1
            continue
        checked += 1
        assert bitops_percent(layers, result) <= budget
        if bitops_percent(layers, policy) <= budget:
            assert result == policy
        for before, after in ((policy.weight_bits, result.weight_bits), (policy.act_bits, result.act_bits)):
            assert after[0] == after[-1] == 8
            lowered = [b - a for b, a in zip(before, after)]
            assert all(step >= 0 for step in lowered)
            # sweeps run back to front: a layer is never lowered more than a later one, unless that one hit 2 bits
            for i in range(1, count - 1):
                for j in range(i + 1, count - 1):
                    assert lowered[i] <= lowered[j] or after[j] == 2
    assert checked > 150 and refused > 10


def test_enforce_budget_stops_at_the_first_step_within_budget() -> None:
    layers = [LayerInfo(i, str(i), "linear", 16, 16, 1, 1, 1, 1, 272, False) for i in range(5)]  # 256 MACs each
    policy = BitPolicy.uniform(5, 8)  # 64 bits per MAC everywhere: 6.25% of 1024
    # room for exactly three steps: act 8->7 of layer 3, its weight 8->7, then the act of layer 2
    budget = 100 * (64 * 5 - 16) / (1024 * 5)  # bits products 64+64+64+49+64 = 305 > 304 >= 64+64+56+49+64 = 297
    result = enforce_budget(layers, policy, budget)
    assert result.act_bits == (8, 8, 7, 7, 8) and result.weight_bits == (8, 8, 8, 7, 8)
    with pytest.raises(ValueError, match="out of reach"):
        enforce_budget(layers, policy, 100 * (64 * 2 + 4 * 3) / (1024 * 5) - 1e-9)
    assert enforce_budget(layers, policy, 100 * (64 * 2 + 4 * 3) / (1024 * 5)) == BitPolicy.uniform(5, 2)


def test_bit_policy_json_round_trip_and_validation(tmp_path) -> None:
    policy = BitPolicy((8, 3, 5, 8), (8, 2, 7, 8))
    assert BitPolicy.from_dict(policy.to_dict()) == policy and policy.to_dict()["version"] == 1
    policy.save(tmp_path / "policy.json")
    assert BitPolicy.load(tmp_path / "policy.json") == policy
    assert BitPolicy.uniform(3, 4) == BitPolicy((8, 4, 8), (8, 4, 8))
    assert BitPolicy.uniform(1, 4) == BitPolicy((8,), (8,))
    for bad, match in (
        ({**policy.to_dict(), "version": 2}, "version must be 1"),
        ({**policy.to_dict(), "extra": 1}, "exactly the keys"),
    ):
        with pytest.raises(ValueError, match=match):
            BitPolicy.from_dict(bad)
    for weight, act, match in (
        ((8, 1, 8), (8, 4, 8), r"in \[2, 8\], got 1"),
        ((8, 9, 8), (8, 4, 8), r"in \[2, 8\], got 9"),
        ((4, 4, 8), (8, 4, 8), "first and last layer must be 8"),
        ((8, 4, 8), (8, 4, 4, 8), "one entry per layer"),
        ((8, True, 8), (8, 4, 8), "integers"),
    ):
        with pytest.raises(ValueError, match=match):
            BitPolicy(weight, act)
    (tmp_path / "broken.json").write_text("{")
    (tmp_path / "binary.json").write_bytes(b"\x80\xff")
    for broken in ("broken.json", "binary.json"):
        with pytest.raises(ValueError, match=f"{broken} is not a JSON bit policy"):
            BitPolicy.load(tmp_path / broken)


def test_from_actions_follows_eq_10() -> None:
    # b = round(b_min - 0.5 + a (b_max - b_min + 1)) = round(1.5 + 7a): each bit-width gets 1/7 of [0, 1]
    policy = BitPolicy.from_actions([0.3, 0.0, 0.14, 0.15, 0.5, 0.99, 1.0, 0.0], [0.0] * 8)
    assert policy.weight_bits == (8, 2, 2, 3, 5, 8, 8, 8)
    assert policy.act_bits == (8, 2, 2, 2, 2, 2, 2, 8)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        BitPolicy.from_actions([0.5, 1.5, 0.5], [0.5] * 3)


def test_kl_clip_cuts_outliers_and_keeps_a_uniform_range() -> None:
    generator = torch.Generator().manual_seed(0)
    gaussian = torch.randn(100_000, generator=generator)
    with_outliers = torch.cat([gaussian, torch.full((20,), 50.0)])
    assert 3.0 < kl_clip(with_outliers, 8, signed=True) < 6.0  # 20 values at 50 sigma are clipped
    uniform = torch.rand(100_000, generator=generator)
    for bits in (2, 4, 8):
        assert kl_clip(uniform, bits, signed=False) == pytest.approx(float(uniform.max()), rel=0.01)
    # half the values of a ReLU output are exact zeros: they must not pull the clip into the bulk
    assert kl_clip(torch.relu(gaussian), 8, signed=False) > 3.0
    assert kl_clip(torch.zeros(10), 4, signed=True) == 1.0
    with pytest.raises(ValueError, match="unsigned grid"):
        kl_clip(gaussian, 4, signed=False)
    with pytest.raises(ValueError, match="bits must be"):
        kl_clip(gaussian, 1, signed=True)


def calibrated(name: str, policy_bits: int, n: int = 64) -> tuple[nn.Module, MixedPrecisionModel]:
    """A registered model with fitted BatchNorm and centred logits, and its calibrated mixed-precision copy."""
    shape = SHAPES.get(name, (3, 8, 8))
    torch.manual_seed(0)
    model = build_model(name, make_info(shape)).eval()
    fit_batchnorm(model, lattice_images(128, shape, seed=4), seed=1)
    center_logits(model, lattice_images(128, shape, seed=4))
    policy = BitPolicy.uniform(len(layer_infos(model, shape)), policy_bits)
    return model, calibrate(prepare_qat(model, policy), lattice_images(n, shape, seed=2))


@pytest.mark.parametrize("name", model_names())
def test_every_registered_model_quantizes_at_4_bits(name: str) -> None:
    model, mixed = calibrated(name, 4, n=16)
    assert isinstance(mixed, MixedPrecisionModel)
    assert len(mixed.quantized_layers()) == len(layer_infos(model, SHAPES.get(name, (3, 8, 8))))
    images = lattice_images(8, SHAPES.get(name, (3, 8, 8)), seed=3).float() / 255
    with torch.no_grad():
        logits = mixed(images)
    assert logits.shape == (8, 10) and torch.isfinite(logits).all()


def relative_error(name: str, bits: int) -> tuple[float, float]:
    """(||mixed - float|| / ||float|| of the logits, top-1 agreement) of a uniform ``bits`` policy on test images."""
    model, mixed = calibrated(name, bits)
    images = lattice_images(128, SHAPES.get(name, (3, 8, 8)), seed=3).float() / 255
    with torch.no_grad():
        fake, real = mixed(images), model(images)
    return float((fake - real).norm() / real.norm()), float((fake.argmax(1) == real.argmax(1)).float().mean())


@pytest.mark.parametrize("name", ["mlp", "cnn", "resnet8", "resnet20"])
def test_8_bit_policy_stays_close_to_the_float_model(name: str) -> None:
    error, agreement = relative_error(name, 8)
    # logits are centred over the data (so small): 3% to 6% here; a lost layer or a wrong grid gives order 1
    assert error < 0.1 and agreement > 0.9


@pytest.mark.parametrize("name", ["cnn", "mobilenetv2"])
def test_error_shrinks_with_more_bits(name: str) -> None:
    # The random MobileNetV2's centred logits vary little between images (std 0.1 against features of
    # order 1), so even 8 bits leaves a 30% relative error there (weights or activations alone: 20%).
    errors = [relative_error(name, bits)[0] for bits in (4, 6, 8)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.35


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_quantized_tensors_take_at_most_2_to_the_b_levels(bits: int) -> None:
    _, mixed = calibrated("cnn", bits)
    inputs: list[torch.Tensor] = []
    layers = mixed.quantized_layers()
    handles = [layer.register_forward_pre_hook(lambda _, args: inputs.append(args[0])) for layer in layers]
    with torch.no_grad():
        mixed(lattice_images(32, (1, 28, 28), seed=3).float() / 255)
        for handle in handles:
            handle.remove()
        for layer, x in zip(layers, inputs):
            weight_levels = layer.quantized_weight().unique().numel()
            act_levels = layer.quantize_input(x).unique().numel()
            assert weight_levels <= 2**layer.weight_bits - 1  # symmetric: codes -(2^(b-1) - 1) .. 2^(b-1) - 1
            assert act_levels <= 2**layer.act_bits - bool(layer.act_signed)
            assert weight_levels >= min(3, 2**layer.weight_bits - 1) and act_levels >= 2  # not collapsed
    # the normalised image can be negative (signed grid); inputs after a ReLU cannot (unsigned grid)
    assert [bool(layer.act_signed) for layer in mixed.quantized_layers()] == [True, False, False, False]


def test_mobilenet_linear_bottlenecks_get_a_signed_grid() -> None:
    _, mixed = calibrated("mobilenetv2", 4, n=16)
    signed = {name for name, layer in zip(mixed.layer_names, mixed.quantized_layers()) if bool(layer.act_signed)}
    # the stem reads the normalised image; every expansion conv reads a projection (+ residual) without ReLU
    assert signed == {"stem.0"} | {f"blocks.{i}.block.0" for i in range(1, 7)} | {"head.0"}


def test_prepare_dispatches_on_the_config_and_leaves_the_model_alone() -> None:
    model = small_net()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    mixed = prepare_qat(model, BitPolicy((8, 4, 2, 8), (8, 3, 6, 8)))
    assert isinstance(mixed, MixedPrecisionModel) and mixed.training == model.training
    bits = [(layer.weight_bits, layer.act_bits) for layer in mixed.quantized_layers()]
    assert bits == [(8, 8), (4, 3), (2, 6), (8, 8)]
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())
    with pytest.raises(RuntimeError, match="not calibrated"):
        mixed(torch.rand(2, 1, 8, 8))
    with pytest.raises(ValueError, match="policy has 3 layers"):
        prepare_qat(model, BitPolicy.uniform(3, 4))
    with pytest.raises(ValueError, match="QuantConfig or a BitPolicy"):
        prepare_qat(model, {"bits": 4})
    with pytest.raises(ValueError, match="non-empty"):
        calibrate(mixed, torch.zeros(0, 1, 8, 8))
    assert not isinstance(prepare_qat(build_model("mlp", make_info((1, 4, 4))), QuantConfig()), MixedPrecisionModel)


def test_straight_through_gradients_fine_tune_the_quantized_model() -> None:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    images = lattice_images(64, (1, 8, 8), seed=2).float() / 255
    labels = (images.flatten(1) @ torch.randn(64, 10, generator=generator)).argmax(1)  # a learnable task
    mixed = quantize(small_net(), BitPolicy((8, 4, 4, 8), (8, 4, 4, 8)), images)
    optimizer = torch.optim.Adam(mixed.parameters(), lr=0.01)
    losses = []
    for _ in range(40):
        optimizer.zero_grad()
        loss = F.cross_entropy(mixed(images), labels)
        loss.backward()
        losses.append(loss.item())
        optimizer.step()
    for layer in mixed.quantized_layers():
        assert layer.layer.weight.grad is not None and float(layer.layer.weight.grad.abs().sum()) > 0
    assert losses[-1] < 0.5 * losses[0]  # rounding does not block learning


@pytest.mark.parametrize("name", ["cnn", "mobilenetv2"])
def test_checkpoint_round_trip_rebuilds_identical_outputs(name: str, tmp_path) -> None:
    _, mixed = calibrated(name, 4, n=16)
    info = make_info(SHAPES.get(name, (3, 8, 8)))
    path = tmp_path / "mixed.pt"
    metadata = model_metadata(name, {}, info, sigma=0.25, bit_policy=mixed.policy.to_dict())
    save_checkpoint(path, Checkpoint(mixed.state_dict(), metadata))
    images = lattice_images(16, info.shape, seed=3).float() / 255
    loaded = load_checkpoint(path).build()
    restored, _ = load_model(path)  # what `qrobust certify --method float-fp` loads
    frozen = freeze_for_inference(restored, images)  # ... and runs with --fast
    with torch.no_grad():
        expected = mixed.eval()(images)
        assert isinstance(loaded, MixedPrecisionModel) and loaded.policy == mixed.policy
        assert torch.equal(loaded(images), expected) and torch.equal(restored(images), expected)
        torch.testing.assert_close(frozen(images), expected, rtol=1e-4, atol=1e-4)


def test_checkpoint_with_a_bad_policy_is_refused(tmp_path) -> None:
    info = make_info((1, 28, 28))
    model = build_model("mlp", info)
    for policy, match in (({"version": 7}, "corrupt bit_policy"), (BitPolicy.uniform(5, 4).to_dict(), "does not fit")):
        path = tmp_path / "bad.pt"
        save_checkpoint(path, Checkpoint(model.state_dict(), model_metadata("mlp", {}, info, bit_policy=policy)))
        with pytest.raises(CheckpointError, match=match):
            load_checkpoint(path).build()
