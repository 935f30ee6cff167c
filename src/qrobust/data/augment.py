"""Training-time augmentation on the uint8 lattice, so augmented images stay valid lattice points."""

from __future__ import annotations

from collections.abc import Callable

import torch

from qrobust.data.base import DatasetInfo

Augmentation = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def _reflect_indices(size: int, padding: int, device: torch.device) -> torch.Tensor:
    """Source index of each position of an axis reflection-padded by ``padding`` (edge not repeated)."""
    positions = torch.arange(-padding, size + padding, device=device)
    positions = positions.abs()  # left border: -k -> k
    return torch.where(positions >= size, 2 * (size - 1) - positions, positions)  # right border


def random_crop_flip(images: torch.Tensor, padding: int = 4, generator: torch.Generator | None = None) -> torch.Tensor:
    """Reflection-pad each image by ``padding`` pixels, crop a random HxW window, flip it with prob. 1/2.

    The standard CIFAR augmentation of "Deep Residual Learning for Image Recognition" (He et al., 2016),
    with reflection instead of zero padding. ``images`` is uint8 (N, C, H, W); so is the result.
    Offsets and flips are drawn independently per image from ``generator``.
    """
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(
            f"images must be a uint8 tensor of shape (N, C, H, W), got {images.dtype} of shape {tuple(images.shape)}"
        )
    n, channels, height, width = images.shape
    if not 0 <= padding < min(height, width):
        raise ValueError(f"padding must be in [0, {min(height, width) - 1}] for {height}x{width} images, got {padding}")
    device = images.device
    top = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=device)
    left = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=device)
    flip = torch.rand(n, generator=generator, device=device) < 0.5

    rows = top[:, None] + torch.arange(height, device=device)  # (N, H), in padded coordinates
    cols = left[:, None] + torch.arange(width, device=device)  # (N, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    rows = _reflect_indices(height, padding, device)[rows]  # (N, H), in input coordinates
    cols = _reflect_indices(width, padding, device)[cols]  # (N, W)

    batch = torch.arange(n, device=device)[:, None, None, None]
    channel = torch.arange(channels, device=device)[None, :, None, None]
    return images[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]  # (N, C, H, W)


def _cifar_augmentation(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return random_crop_flip(images, padding=4, generator=generator)


def augmentation_for(info: DatasetInfo) -> Augmentation | None:
    """The training augmentation for a dataset: 4-pixel crop and flip for CIFAR-10/100, else ``None``.

    Digits (MNIST, SVHN, scikit-learn digits) must not be flipped, and Fashion-MNIST is trained
    without augmentation in the papers we follow.
    """
    if info.name in ("cifar10", "cifar100"):
        return _cifar_augmentation
    return None
