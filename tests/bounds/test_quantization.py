"""verify_quantization: the int8 engine's logits lie inside the bounds, and certified inputs keep their prediction."""

import pytest
import torch

from qrobust.bounds import ReluNetwork, quantization_noise, verify_quantization
from qrobust.quant import QuantConfig, calibrate, convert, prepare_qat

from .conftest import digits, trained


def int8_of(model, margin=0):
    calibration = digits().images[::5]
    return convert(calibrate(prepare_qat(model, QuantConfig(input_margin=margin)), calibration))


@pytest.mark.parametrize(
    "name, margin, least", [("mlp", 0, 0.5), ("tiny_cnn", 0, 0.05), ("tiny_cnn", 40, None), ("mlp", 255, None)]
)
def test_int8_logits_lie_in_the_bounds_and_certified_inputs_agree(name, margin, least):
    """``least``: the certified fraction the bounds reach (interval bounds loosen with depth and pooling;
    None where the input step > 1 adds noise on every pixel and soundness alone is checked)."""
    model = trained("mlp", depth=3, width=16) if name == "mlp" else trained("tiny_cnn")
    int8 = int8_of(model, margin)
    images = digits().images[1::3][:300]
    result = verify_quantization(model, int8, images)
    logits = int8(images).double() * int8.logit_scale  # (N, classes), real units
    assert bool(((logits >= result.logit_lower) & (logits <= result.logit_upper)).all())
    certified = result.certified
    assert bool((int8.predict(images)[certified] == result.float_predictions[certified]).all())
    assert least is None or least < result.fraction < 1.0, (
        "the certificate is too loose to be useful, or the test too easy"
    )
    with torch.no_grad():
        assert bool((result.float_predictions == model(images.float() / 255).argmax(1)).all())


def test_noise_bounds_cover_the_dequantized_weights():
    model = trained("tiny_cnn")
    int8 = int8_of(model)
    bounds = quantization_noise(model, int8)
    network = ReluNetwork.from_model(model)
    ops = [op for op in int8.ops if hasattr(op, "weight_scale")]
    for k, op in enumerate(ops):
        dequantized = op.weight.double() * op.weight_scale.view(-1, *[1] * (op.weight.dim() - 1))
        assert bool(((dequantized - network.layers[k].weight).abs() <= bounds.noise[k].weight_radius).all())
        assert float(bounds.noise[k].weight_radius.max()) <= float(op.weight_scale.max()) / 2 + 1e-12
    assert bounds.noise[0].input_noise == 0.0 and bounds.noise[1].input_noise > 0


def test_mismatched_models_are_refused():
    int8 = int8_of(trained("mlp", depth=3, width=16))
    with pytest.raises(ValueError, match="do not match"):
        quantization_noise(trained("mlp", depth=2, width=12), int8)
    with pytest.raises(ValueError, match="Int8Model"):
        verify_quantization(trained("mlp", depth=2, width=12), "model.int8.pt", digits().images[:2])
    with pytest.raises(ValueError, match="lattice"):
        verify_quantization(trained("mlp", depth=3, width=16), int8, (digits().images[:2].double() + 0.5) / 256)
