"""Plain PyTorch data on the uint8 lattice: any map-style ``Dataset`` or ``DataLoader`` of (image, label).

Training, accuracy and the other workflows take a :class:`LatticeDataset`; ``as_lattice_dataset`` turns
what a PyTorch user already has into one::

    train_set = as_lattice_dataset(TensorDataset(images, labels))        # uint8 (N, C, H, W) or [0, 1] floats
    test_set = as_lattice_dataset(DataLoader(test_data, batch_size=256), info=train_set.info)

Images are uint8 lattice values or floats in [0, 1] (``ToTensor()`` output); floats are mapped to the
nearest lattice point round(255 x), which is exact for images that came from 8-bit files. A
DataLoader is run once and its batches collected, so random transforms in it are drawn once, not per
epoch (qrobust's training has its own augmentation and batching).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from qrobust.data.base import DatasetInfo, LatticeDataset, dataset_from_lattice
from qrobust.errors import QRobustError

_HINT = "images must be (C, H, W) tensors, uint8 or float in [0, 1] (e.g. transforms.ToTensor()), labels integers"


def as_lattice_dataset(
    data: LatticeDataset | Dataset | DataLoader,
    *,
    info: DatasetInfo | None = None,
    classes: Sequence[str] | None = None,
    name: str | None = None,
) -> LatticeDataset:
    """``data`` as a :class:`LatticeDataset`: uint8 images (N, C, H, W) and int64 labels (N,).

    Args:
        data: a LatticeDataset (returned as it is unless ``info`` differs from its own), a map-style
            ``Dataset`` whose items are (image (C, H, W), label) pairs (``TensorDataset`` is read
            whole), or a ``DataLoader`` yielding such pairs or batches (B, C, H, W) and (B,).
        info: the training split's info, to check and reuse its shape, classes and statistics; default:
            computed from these images, named ``name`` (default the class name of ``data``).
        classes: the class names, index = label; default "0".."K-1" with K = max label + 1.

    Raises :class:`QRobustError` with one line for anything else: other ranks or dtypes, NaN, values
    outside [0, 1], non-integer labels, images of different shapes, no examples.
    """
    if isinstance(data, LatticeDataset) and info in (None, data.info) and classes is None:
        return data
    source = name or type(data).__name__
    if isinstance(data, LatticeDataset):
        images, labels = data.images, data.labels
    elif isinstance(data, TensorDataset):
        if len(data.tensors) != 2:
            raise QRobustError(f"a TensorDataset of (image, label) needs 2 tensors, got {len(data.tensors)}")
        images, labels = _lattice(data.tensors[0], batched=True), data.tensors[1]
    elif isinstance(data, DataLoader):
        images, labels = _collect(data, batched=data.batch_sampler is not None)  # batch_size=None: single items
    elif isinstance(data, Dataset) and hasattr(data, "__len__"):
        images, labels = _collect((data[i] for i in range(len(data))), batched=False)
    else:
        raise QRobustError(
            f"expected a LatticeDataset, a map-style torch Dataset or a DataLoader of (image, label), "
            f"got {type(data).__name__}"
        )
    return dataset_from_lattice(images, torch.as_tensor(labels).cpu(), source=source, classes=classes, info=info)


def _collect(items: Iterable, batched: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate (image, label) pairs, or batches of them, into images (N, C, H, W) and labels (N,)."""
    images, labels = [], []
    for index, item in enumerate(items):
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise QRobustError(f"item {index} is a {type(item).__name__}, not an (image, label) pair; {_HINT}")
        image, label = item
        images.append(_lattice(image, batched, index))
        labels.append(_label(label, batched, index))
    if not images:
        raise QRobustError("the dataset holds no examples")
    shapes = {tuple(batch.shape[1:]) for batch in images}
    if len(shapes) > 1:
        raise QRobustError(f"images have different shapes {sorted(shapes)[:3]} (C, H, W): resize or crop them to one")
    return torch.cat(images), torch.cat(labels)


def _lattice(images: object, batched: bool, index: int | None = None) -> torch.Tensor:
    """uint8 lattice images (B, C, H, W) of a uint8 or [0, 1] float image (C, H, W), or batch if ``batched``."""
    where = "images" if index is None else f"item {index}"
    if not isinstance(images, (torch.Tensor, np.ndarray)):
        raise QRobustError(f"{where}: got a {type(images).__name__}; {_HINT}")
    x = torch.as_tensor(images).detach().cpu()
    if x.dim() != (4 if batched else 3):
        shape = "(B, C, H, W)" if batched else "(C, H, W)"
        raise QRobustError(f"{where}: images must have shape {shape}, got {tuple(x.shape)}; {_HINT}")
    if x.dtype == torch.uint8:
        return x if batched else x[None]
    if not x.is_floating_point():
        raise QRobustError(f"{where}: image dtype {x.dtype} is neither uint8 nor float; {_HINT}")
    if not torch.isfinite(x).all():
        raise QRobustError(f"{where}: images contain NaN or infinite values")
    if x.numel() and (x.min() < 0 or x.max() > 1):
        raise QRobustError(
            f"{where}: float images must lie in [0, 1], got values in [{x.min().item():.3g}, {x.max().item():.3g}] "
            "(undo any normalisation: qrobust models normalise inside)"
        )
    lattice = x.to(torch.float32).mul(255).round_().to(torch.uint8)  # the nearest lattice point
    return lattice if batched else lattice[None]


def _label(label: object, batched: bool, index: int) -> torch.Tensor:
    """Labels (B,) of a label, or of a batch of them if ``batched``; their dtype is checked with the rest."""
    if isinstance(label, bool) or not isinstance(label, (int, np.integer, torch.Tensor, np.ndarray)):
        raise QRobustError(f"item {index}: label must be an integer class index, got {type(label).__name__}")
    y = torch.as_tensor(label).cpu()
    if y.dim() != (1 if batched else 0):
        shape = "(B,)" if batched else "()"
        raise QRobustError(f"item {index}: labels must be class indices of shape {shape}, got {tuple(y.shape)}")
    return y.reshape(-1)
