import numpy as np
import pytest
import torch
from scipy import stats

from qrobust.errors import QRobustError
from qrobust.smoothing import FloatRS, FloatRSQuant, IntRS, LatticeRS, SmoothedClassifier, clopper_pearson_lower
from qrobust.smoothing.lattice import LatticeRadiusTable


def test_float_quant_feeds_the_rounded_unclipped_noisy_image_on_the_lattice():
    """The int8 model's input quantizer clips, not the method."""
    batch = torch.tensor([[[0.0, 0.5], [1.0, 0.2]]]).expand(1000, 1, 2, 2)
    inputs = FloatRSQuant(0.25).perturb(batch, torch.Generator().manual_seed(0))
    noise = FloatRS(0.25).perturb(batch, torch.Generator().manual_seed(0))
    assert inputs.dtype == torch.int16 and inputs.shape == (1000, 1, 2, 2)
    assert torch.equal(inputs, (noise * 255).round().to(torch.int16))
    assert (inputs < 0).any() and (inputs > 255).any()


def test_float_radius_rule():
    method = FloatRS(0.5)
    assert method.radius(500, 1000, 0.001) is None  # pA_lower < 1/2
    p_lower = clopper_pearson_lower(990, 1000, 0.001)
    assert method.radius(990, 1000, 0.001) == pytest.approx(0.5 * stats.norm.ppf(p_lower))
    with pytest.raises(ValueError, match="sigma"):
        FloatRSQuant(0.0)


def test_int_rs_adds_discrete_noise_on_the_lattice_unclipped():
    """x + n as int16, outside [0, 255] where the noise takes it: the int8 model's input quantizer clips."""
    images = torch.tensor([[[0, 255], [128, 7]]], dtype=torch.uint8).expand(20_000, 1, 2, 2)
    noisy = IntRS(0.1).perturb(images, torch.Generator().manual_seed(0))
    assert noisy.dtype == torch.int16
    assert torch.equal(noisy, IntRS(0.1).sample_noise(tuple(images.shape), torch.Generator().manual_seed(0)) + images)
    offsets = noisy[:, 0, 1, 0].to(torch.int32) - 128
    assert abs(offsets.float().mean().item()) < 0.5
    assert offsets.float().std().item() == pytest.approx(25.5, rel=0.03)
    assert (noisy[:, 0, 0, 0] < 0).float().mean() == pytest.approx(0.5, abs=0.02)  # half the noise leaves [0, 255]
    assert (noisy[:, 0, 0, 1] > 255).float().mean() == pytest.approx(0.5, abs=0.02)
    assert torch.equal(noisy, IntRS(0.1).perturb(images, torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match="uint8"):
        IntRS(0.1).perturb(images.float(), None)


def test_int_rs_radius_is_the_sound_table_lookup():
    method = IntRS(0.25)
    table = LatticeRadiusTable(63.75, 1000, 0.001)
    for count in (400, 600, 990, 1000):
        squared = table.squared_radius(count)
        assert method.radius(count, 1000, 0.001) == (None if squared is None else np.sqrt(squared) / 255)
    assert method.table(1000, 0.001) is method.table(1000, 0.001)  # built once
    # at sigma = 0.25 the sound radius is within one lattice step below Cohen's
    cohen = FloatRS(0.25).radius(990, 1000, 0.001)
    assert cohen - 1 / 255 <= method.radius(990, 1000, 0.001) <= cohen


def test_int_rs_certifies_a_lattice_image(linear_binary):
    class Lattice(torch.nn.Module):  # the float linear classifier, fed uint8 images
        def forward(self, images):
            return linear_binary(images.float() / 255)

    smoothed = SmoothedClassifier(Lattice(), 2, IntRS(0.25))
    image = torch.tensor([[[255, 40], [128, 128]]], dtype=torch.uint8)
    certificate = smoothed.certify(image, n0=50, n=1000, alpha=0.001, generator=torch.Generator().manual_seed(0))
    assert certificate.label == 1 and 0 < certificate.radius < linear_binary.margin(image.float() / 255)


def test_lattice_smoothing_is_int_rs_with_the_model_reading_floats(linear_binary):
    """LatticeRS feeds float32(x + n) / 255 of IntRS's exact integer sum to an fp32 model: its certificates
    equal IntRS's with the division moved into the model, and its radius is IntRS's sound table."""

    class Divide(torch.nn.Module):
        def forward(self, lattice):
            return linear_binary(lattice.to(torch.float32) / 255)

    images = torch.tensor([[[0, 255], [128, 7]]], dtype=torch.uint8).expand(1000, 1, 2, 2)
    noise = IntRS(0.25).sample_noise(tuple(images.shape), torch.Generator().manual_seed(0))
    assert torch.equal(LatticeRS(0.25).apply(images, noise), (images + noise).float() / 255)
    assert (
        LatticeRS.model_kind == FloatRS.model_kind == "float" and IntRS.model_kind == FloatRSQuant.model_kind == "int8"
    )
    image = torch.tensor([[[255, 40], [128, 128]]], dtype=torch.uint8)
    lattice = SmoothedClassifier(linear_binary, 2, LatticeRS(0.25), batch_size=128)
    integer = SmoothedClassifier(Divide(), 2, IntRS(0.25), batch_size=128)
    got, expected = (
        smoothed.certify(image, n0=50, n=1000, alpha=0.001, generator=torch.Generator().manual_seed(3))
        for smoothed in (lattice, integer)
    )
    assert got.label == expected.label == 1 and got.radius == expected.radius > 0
    assert np.array_equal(got.counts, expected.counts)
    assert LatticeRS(0.25).radius(990, 1000, 0.001) == IntRS(0.25).radius(990, 1000, 0.001)
    with pytest.raises(QRobustError, match="uint8 lattice image for lattice smoothing"):
        lattice.certify(image.float() / 255, n0=10, n=10, alpha=0.01)
