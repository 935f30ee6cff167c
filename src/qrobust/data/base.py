"""Datasets on the integer input lattice: uint8 images in 0..255 with labels, and a float [0, 1] view."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import torch

from qrobust.errors import QRobustError


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about its inputs: shape, classes and per-channel statistics.

    ``mean`` and ``std`` are per-channel statistics of the float [0, 1] view of the training set;
    models use them in their first (normalisation) layer so that noise and radii stay in [0, 1] space.
    """

    name: str
    shape: tuple[int, int, int]  # (channels, height, width)
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @classmethod
    def from_dict(cls, fields: dict) -> DatasetInfo:
        """The inverse of ``dataclasses.asdict`` (JSON turns tuples into lists)."""
        return cls(
            name=fields["name"],
            shape=tuple(fields["shape"]),
            classes=tuple(fields["classes"]),
            mean=tuple(fields["mean"]),
            std=tuple(fields["std"]),
        )


@dataclass(frozen=True)
class LatticeDataset:
    """Images on the uint8 lattice, shape (N, C, H, W), with int64 labels of shape (N,)."""

    images: torch.Tensor
    labels: torch.Tensor
    info: DatasetInfo

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(
                f"images must be a uint8 tensor of shape (N, C, H, W), "
                f"got {self.images.dtype} of shape {tuple(self.images.shape)}"
            )
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"labels must have shape ({self.images.shape[0]},), got {tuple(self.labels.shape)}")
        if tuple(self.images.shape[1:]) != self.info.shape:
            raise ValueError(
                f"images have shape {tuple(self.images.shape[1:])}, but {self.info.name} expects {self.info.shape}"
            )

    def __len__(self) -> int:
        return self.images.shape[0]

    def floats(self) -> torch.Tensor:
        """The float32 [0, 1] view models take: images / 255."""
        return to_unit_interval(self.images)

    def select(self, indices: torch.Tensor | list[int]) -> LatticeDataset:
        """The examples at ``indices``, in that order."""
        index = torch.as_tensor(indices, dtype=torch.long)
        return LatticeDataset(self.images[index], self.labels[index], self.info)

    def subset(self, n: int, seed: int = 0) -> LatticeDataset:
        """``n`` examples drawn without replacement by ``seed``, kept in their original order."""
        if not 1 <= n <= len(self):
            raise ValueError(f"subset size must be in [1, {len(self)}], got {n}")
        generator = torch.Generator().manual_seed(seed)
        picked = torch.randperm(len(self), generator=generator)[:n]
        return self.select(picked.sort().values)

    def split(self, fraction: float, seed: int = 0) -> tuple[LatticeDataset, LatticeDataset]:
        """A seeded random split into (first, rest) with ``fraction`` of the examples in the first part."""
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"split fraction must be in (0, 1), got {fraction}")
        generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(self), generator=generator)
        cut = round(fraction * len(self))
        return self.select(order[:cut].sort().values), self.select(order[cut:].sort().values)


def to_unit_interval(images: torch.Tensor) -> torch.Tensor:
    """Integer lattice values to float32 v / 255: uint8 images land in [0, 1], unclipped x + noise (int16)
    outside it, as a model with a wide input range (``QuantConfig.input_margin``) reads it."""
    return images.to(torch.float32).div_(255.0)


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and population std of the [0, 1] view of uint8 images (N, C, H, W).

    Computed exactly from per-channel value histograms (256 bins), so memory stays O(C) whatever N.
    """
    channels = images.shape[1]
    flat = images.transpose(0, 1).reshape(channels, -1).to(torch.int64)  # (C, N*H*W)
    offsets = torch.arange(channels)[:, None] * 256
    counts = torch.bincount((flat + offsets).reshape(-1), minlength=256 * channels).reshape(channels, 256)
    values = torch.arange(256, dtype=torch.float64) / 255.0
    total = counts.sum(1).to(torch.float64)
    mean = (counts * values).sum(1) / total
    variance = ((counts * values.square()).sum(1) / total - mean.square()).clamp_(min=0.0)
    return tuple(mean.tolist()), tuple(variance.sqrt().tolist())


def dataset_from_lattice(
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    source: str,
    classes: Sequence[str] | None = None,
    info: DatasetInfo | None = None,
) -> LatticeDataset:
    """A :class:`LatticeDataset` of uint8 ``images`` (N, C, H, W) and integer ``labels`` (N,) from ``source``.

    With ``info`` (e.g. the training split's), its shape, classes and statistics are checked and reused,
    so a test split is normalised with the training statistics. Without it, the info is named ``source``,
    its classes are ``classes`` (default "0".."K-1" for K = max label + 1) and its mean and std are the
    images' own. Raises :class:`QRobustError` naming ``source`` on bad labels, shapes or constant channels.
    """
    if len(images) == 0:
        raise QRobustError(f"{source} holds no images")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise QRobustError(f"{source}: labels must be integer class indices, got dtype {labels.dtype}")
    if labels.shape != (len(images),):
        raise QRobustError(
            f"{source}: labels must have shape ({len(images)},) to match the images, got {tuple(labels.shape)}"
        )
    labels = labels.to(torch.int64)
    shape = cast(tuple[int, int, int], tuple(images.shape[1:]))  # (C, H, W) when images are (N, C, H, W)
    if info is not None:
        if classes is not None and tuple(classes) != info.classes:
            raise QRobustError(f"{source}: classes {list(classes)} differ from those of {info.name}")
        if shape != info.shape:
            raise QRobustError(f"{source}: images have shape {shape} (C, H, W), but {info.name} has {info.shape}")
        names: tuple[str, ...] | None = info.classes
    else:
        names = tuple(str(c) for c in classes) if classes is not None else None
        if names is not None and len(set(names)) != len(names):
            raise QRobustError(f"{source}: class names must be distinct, got {list(names)}")
    num_classes = len(names) if names is not None else int(labels.max()) + 1
    if labels.min() < 0 or labels.max() >= num_classes:
        raise QRobustError(
            f"{source}: labels must be in 0..{num_classes - 1}, got {labels.min().item()}..{labels.max().item()}"
        )
    if info is None:
        mean, std = channel_stats(images)
        if min(std) == 0.0:
            raise QRobustError(
                f"{source}: channel {std.index(0.0)} is constant (std 0), so it cannot be normalised; "
                "pass the info of a varied training set"
            )
        info = DatasetInfo(source, shape, names or tuple(str(c) for c in range(num_classes)), mean, std)
    return LatticeDataset(images.contiguous(), labels, info)
