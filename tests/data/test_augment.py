"""Augmentation: each output is a reflection-padded crop (maybe flipped) of its input, reproducibly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qrobust.data import DATASET_NAMES, augmentation_for, dataset_info, random_crop_flip


def random_images(n: int, channels: int = 3, height: int = 8, width: int = 10, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, channels, height, width), generator=generator, dtype=torch.uint8)


def crops_of(image: torch.Tensor, padding: int) -> list[torch.Tensor]:
    """Every HxW window, flipped or not, of ``image`` (C, H, W) reflection-padded by ``padding``."""
    _, height, width = image.shape
    padded = F.pad(image[None].double(), (padding,) * 4, mode="reflect")[0]
    windows = []
    for top in range(2 * padding + 1):
        for left in range(2 * padding + 1):
            window = padded[:, top : top + height, left : left + width]
            windows += [window, window.flip(-1)]
    return windows


@pytest.mark.parametrize("padding", [0, 1, 4])
def test_outputs_are_crops_of_the_padded_input(padding):
    images = random_images(12)
    out = random_crop_flip(images, padding, torch.Generator().manual_seed(3))
    assert out.dtype == torch.uint8 and out.shape == images.shape and out.is_contiguous()
    for image, augmented in zip(images, out):
        assert any(torch.equal(augmented.double(), window) for window in crops_of(image, padding))


def test_offsets_and_flips_are_spread():
    images = random_images(400, channels=1, height=6, width=6)
    out = random_crop_flip(images, 2, torch.Generator().manual_seed(0))
    seen = set()
    for image, augmented in zip(images, out):
        windows = crops_of(image, 2)
        seen.add(next(i for i, w in enumerate(windows) if torch.equal(augmented.double(), w)))
    assert len(seen) == 2 * 5 * 5  # every offset, flipped and not, occurs among 400 draws


def test_padding_zero_only_flips_about_half():
    images = random_images(1000, channels=1, height=4, width=4)
    out = random_crop_flip(images, 0, torch.Generator().manual_seed(0))
    kept = (out == images).flatten(1).all(1)
    flipped = (out == images.flip(-1)).flatten(1).all(1)
    assert torch.all(kept | flipped)
    assert 400 < flipped.sum().item() < 600


def test_seeded_generator_is_deterministic():
    images = random_images(32)
    first = random_crop_flip(images, generator=torch.Generator().manual_seed(7))
    again = random_crop_flip(images, generator=torch.Generator().manual_seed(7))
    other = random_crop_flip(images, generator=torch.Generator().manual_seed(8))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_input_is_not_modified():
    images = random_images(4)
    copy = images.clone()
    random_crop_flip(images, generator=torch.Generator().manual_seed(0))
    assert torch.equal(images, copy)


@pytest.mark.parametrize(
    ("images", "padding", "message"),
    [
        (torch.zeros(2, 3, 8, 8), 4, "must be a uint8 tensor of shape \\(N, C, H, W\\), got torch.float32"),
        (torch.zeros(3, 8, 8, dtype=torch.uint8), 4, "got torch.uint8 of shape \\(3, 8, 8\\)"),
        (torch.zeros(2, 3, 8, 8, dtype=torch.uint8), -1, "padding must be in \\[0, 7\\] for 8x8 images, got -1"),
        (torch.zeros(2, 3, 4, 8, dtype=torch.uint8), 4, "padding must be in \\[0, 3\\] for 4x8 images, got 4"),
    ],
)
def test_invalid_input(images, padding, message):
    with pytest.raises(ValueError, match=message):
        random_crop_flip(images, padding)


@pytest.mark.parametrize("name", DATASET_NAMES)
def test_augmentation_for(name):
    info = dataset_info(name)
    augment = augmentation_for(info)
    if name not in ("cifar10", "cifar100"):
        assert augment is None  # flipping digits or house numbers changes their meaning
        return
    images = random_images(5, *info.shape)
    out = augment(images, torch.Generator().manual_seed(1))
    assert torch.equal(out, random_crop_flip(images, 4, torch.Generator().manual_seed(1)))
