"""A floating-point false certificate of Gaussian smoothing (Voracek & Hein, ICLR 2023), and why lattice
smoothing has none.

Cohen et al.'s radius assumes the noisy input at x + delta is the noisy input at x shifted by delta. In
float32 it is not: fl(x + e) rounds to nearest even, and the rounding pattern depends on x at a scale far
below any radius. ``RoundingKeyed`` reads it: the share of coordinates whose float32 mantissa ends in a 0
bit. At x = 0, fl(0 + e) = e and the share is 1/2 (std 0.018 over 784 pixels); at x' = 2^-27 in every
pixel (l2 distance 2e-7), e + 2^-27 is an exact tie for |e| in [1/8, 1/4) and rounds to an even mantissa,
so the share is 0.65. Thresholding at 0.575 gives a base classifier that is class 0 around x and class 1
around x', each with probability about 1 - 1e-5: smoothing computed in float32 certifies x with a
radius of 0.67 (n = 2,000, alpha = 0.001) and returns class 1 at x', 2e-7 away.

Lattice smoothing adds integer noise to integer pixels exactly, so the lattice point at x + delta (delta
an integer vector) is exactly the one at x moved by delta, and the model reads a fixed function of it
(float32(z) / 255): the shift argument behind IntRS's sound radius holds in the arithmetic computed.
"""

import torch
from torch import nn

from qrobust.smoothing import FloatRS, IntRS, LatticeRS, SmoothedClassifier

SHAPE = (1, 28, 28)


class RoundingKeyed(nn.Module):
    """Class 1 iff more than 57.5% of the float32 inputs have an even mantissa (last bit 0)."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        even = ((z.to(torch.float32).view(torch.int32) & 1) == 0).float().mean(dim=(1, 2, 3))  # (B,)
        return torch.stack([torch.zeros_like(even), even - 0.575], dim=1)


def test_float32_gaussian_smoothing_certifies_a_ball_with_an_adversarial_example_inside():
    smoothed = SmoothedClassifier(RoundingKeyed(), 2, FloatRS(0.25), batch_size=500)
    x, x_adv = torch.zeros(SHAPE), torch.full(SHAPE, 2.0**-27)
    distance = float((x_adv - x).norm())
    certificate = smoothed.certify(x, n0=100, n=2000, alpha=0.001, generator=torch.Generator().manual_seed(0))
    assert certificate.label == 0 and certificate.radius > 0.6 > 1e6 * distance
    adversarial = smoothed.certify(x_adv, n0=100, n=2000, alpha=0.001, generator=torch.Generator().manual_seed(1))
    assert adversarial.label == 1  # the float-computed smoothed classifier itself, with confidence 1 - alpha


def test_lattice_smoothing_shifts_exactly_and_does_not_issue_it():
    """Moving x by delta moves the float path's noisy input by something else than delta (rounding), and
    the lattice path's by exactly delta; on the same rounding-keyed model, lattice smoothing gives the same
    class at x and at its nearest lattice neighbour, inside the certified radius."""
    generator = torch.Generator().manual_seed(2)
    x, delta = torch.zeros((1, *SHAPE)), torch.full((1, *SHAPE), 2.0**-27)
    noise = FloatRS(0.25).sample_noise((200, *SHAPE), generator)
    moved = FloatRS(0.25).apply(x + delta, noise).double() - FloatRS(0.25).apply(x, noise).double()  # exact
    assert (moved != 2.0**-27).float().mean() > 0.3

    lattice = LatticeRS(0.25)
    image = torch.zeros(SHAPE, dtype=torch.uint8)
    step = torch.zeros((1, *SHAPE), dtype=torch.int16)
    step[0, 0, 14, 14] = 1  # the nearest lattice point: 1/255 away
    neighbour = (image + step).to(torch.uint8)
    integer_noise = lattice.sample_noise((200, *SHAPE), generator)
    assert torch.equal(
        IntRS.apply(lattice, neighbour, integer_noise), IntRS.apply(lattice, image[None], integer_noise) + step
    )

    smoothed = SmoothedClassifier(RoundingKeyed(), 2, lattice, batch_size=500)
    certificate = smoothed.certify(image, n0=100, n=2000, alpha=0.001, generator=torch.Generator().manual_seed(3))
    assert not certificate.abstained and certificate.radius > 1 / 255
    prediction = smoothed.predict(neighbour[0], n=2000, alpha=0.001, generator=torch.Generator().manual_seed(4))
    assert prediction.label == certificate.label
