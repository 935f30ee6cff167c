"""Datasets on the integer input lattice: uint8 images in 0..255 with labels, and a float [0, 1] view."""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
            raise ValueError(
                f"labels must have shape ({self.images.shape[0]},), got {tuple(self.labels.shape)}"
            )
        if tuple(self.images.shape[1:]) != self.info.shape:
            raise ValueError(
                f"images have shape {tuple(self.images.shape[1:])}, "
                f"but {self.info.name} expects {self.info.shape}"
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
        cut = int(round(fraction * len(self)))
        return self.select(order[:cut].sort().values), self.select(order[cut:].sort().values)


def to_unit_interval(images: torch.Tensor) -> torch.Tensor:
    """Integer lattice values to float32 v / 255: uint8 images land in [0, 1], unclipped x + noise (int16)
    outside it, as a model with a wide input range (``QuantConfig.input_margin``) reads it."""
    return images.to(torch.float32).div_(255.0)
