"""Tiny synthetic dataset files written into tmp_path, in the on-disk formats the loaders read."""

from __future__ import annotations

import gzip
import io
import struct
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from qrobust.data import DatasetInfo, LatticeDataset


def _idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file of unsigned bytes: magic 0x00 0x00 0x08 ndim, big-endian dims, data."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def _write_bytes(path: Path, data: bytes, compress: bool) -> Path:
    """Write ``data`` to ``path`` (gzip-compressed, with a .gz suffix, if ``compress``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture
def write_idx_split(rng) -> Callable[..., tuple[np.ndarray, np.ndarray]]:
    """Write random (images, labels) IDX files of one split into a directory; returns the arrays."""

    def write(directory: Path, split: str = "train", n: int = 5, compress: bool = True):
        prefix = "train" if split == "train" else "t10k"
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        _write_bytes(directory / f"{prefix}-images-idx3-ubyte", _idx_bytes(images), compress)
        _write_bytes(directory / f"{prefix}-labels-idx1-ubyte", _idx_bytes(labels), compress)
        return images, labels

    return write


def _cifar_records(
    rng: np.random.Generator, n: int, label_bytes: int, num_classes: int
) -> tuple[bytes, np.ndarray, np.ndarray]:
    labels = rng.integers(0, num_classes, size=(n, label_bytes), dtype=np.uint8)
    images = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
    raw = np.concatenate([labels, images.reshape(n, -1)], axis=1).tobytes()
    return raw, images, labels[:, -1]


def _write_tar_gz(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


@pytest.fixture
def idx_bytes() -> Callable[[np.ndarray], bytes]:
    """Encode a uint8 array as IDX bytes."""
    return _idx_bytes


@pytest.fixture
def cifar_records(rng) -> Callable[..., tuple[bytes, np.ndarray, np.ndarray]]:
    """``n`` random CIFAR binary records: (bytes, images (n, 3, 32, 32), last label byte (n,))."""
    return lambda n, label_bytes, num_classes: _cifar_records(rng, n, label_bytes, num_classes)


@pytest.fixture
def write_tar_gz() -> Callable[[Path, dict[str, bytes]], None]:
    """Write a .tar.gz holding the given members (name -> content)."""
    return _write_tar_gz


@pytest.fixture
def toy_dataset() -> LatticeDataset:
    """20 images of shape 1x4x4, image i filled with the value i and labelled i % 3."""
    info = DatasetInfo("toy", (1, 4, 4), ("a", "b", "c"), (0.5,), (0.25,))
    images = torch.arange(20, dtype=torch.uint8)[:, None, None, None].expand(20, 1, 4, 4).contiguous()
    labels = torch.arange(20) % 3
    return LatticeDataset(images, labels, info)
