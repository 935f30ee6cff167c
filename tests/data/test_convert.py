"""as_lattice_dataset: plain PyTorch datasets and DataLoaders onto the uint8 lattice, exactly, or one clear error."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, SequentialSampler, TensorDataset

from qrobust.data import DatasetInfo, as_lattice_dataset
from qrobust.errors import QRobustError


class Pairs(Dataset):
    """A map-style dataset returning the given items, as a user's own Dataset would."""

    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]


@pytest.fixture
def lattice() -> tuple[torch.Tensor, torch.Tensor]:
    """12 random uint8 images (12, 3, 5, 4) covering 0 and 255, and labels 0..3."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (12, 3, 5, 4), dtype=torch.uint8, generator=generator)
    images[0, 0, 0, 0], images[0, 0, 0, 1] = 0, 255
    return images, torch.arange(12) % 4


def test_a_lattice_dataset_is_returned_as_it_is(toy_dataset):
    assert as_lattice_dataset(toy_dataset) is toy_dataset
    assert as_lattice_dataset(toy_dataset, info=toy_dataset.info) is toy_dataset


@pytest.mark.parametrize("kind", ["uint8", "float32", "float64", "numpy"])
@pytest.mark.parametrize("wrap", ["tensor-dataset", "dataset", "loader", "batch-sampler-loader", "unbatched-loader"])
def test_every_container_and_dtype_gives_the_same_lattice_images(lattice, kind, wrap):
    images, labels = lattice
    x = {
        "uint8": images,
        "float32": images.float() / 255,
        "float64": images.double() / 255,
        "numpy": images.numpy(),
    }[kind]
    data = {
        "tensor-dataset": lambda: TensorDataset(torch.as_tensor(x), labels),
        "dataset": lambda: Pairs([(x[i], int(labels[i])) for i in range(len(x))]),
        "loader": lambda: DataLoader(TensorDataset(torch.as_tensor(x), labels), batch_size=5),
        "batch-sampler-loader": lambda: DataLoader(
            TensorDataset(torch.as_tensor(x), labels), batch_sampler=BatchSampler(SequentialSampler(x), 5, False)
        ),
        "unbatched-loader": lambda: DataLoader(Pairs([(x[i], labels[i]) for i in range(len(x))]), batch_size=None),
    }[wrap]()
    converted = as_lattice_dataset(data)
    assert torch.equal(converted.images, images) and converted.images.dtype == torch.uint8
    assert torch.equal(converted.labels, labels) and converted.labels.dtype == torch.int64
    info = converted.info
    assert (info.shape, info.classes) == ((3, 5, 4), ("0", "1", "2", "3"))
    floats = images.double() / 255
    assert info.mean == pytest.approx(floats.mean((0, 2, 3)).tolist())
    assert info.std == pytest.approx(floats.std((0, 2, 3), correction=0).tolist())


def test_off_lattice_floats_go_to_the_nearest_lattice_point():
    x = torch.tensor([0.0, 0.4 / 255, 0.6 / 255, 100.49 / 255, 1.0]).reshape(1, 1, 1, 5)
    data = TensorDataset(x.expand(2, 1, 1, 5), torch.tensor([0, 1]))
    assert as_lattice_dataset(data).images[0].flatten().tolist() == [0, 0, 1, 100, 255]


def test_info_and_classes_are_used(lattice):
    images, labels = lattice
    train = as_lattice_dataset(TensorDataset(images, labels), classes=["a", "b", "c", "d", "e"], name="mine")
    assert (train.info.name, train.info.classes) == ("mine", ("a", "b", "c", "d", "e"))
    test = as_lattice_dataset(DataLoader(TensorDataset(images[:3], labels[:3])), info=train.info)
    assert test.info is train.info
    other = DatasetInfo("other", (3, 5, 4), ("a", "b", "c", "d"), (0.5,) * 3, (0.2,) * 3)
    assert as_lattice_dataset(train, info=other).info is other


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda x, y: [(x[0], 0)],
            r"^expected a LatticeDataset, a map-style torch Dataset or a DataLoader of \(image, label\), got list$",
        ),
        (lambda x, y: TensorDataset(x), r"^a TensorDataset of \(image, label\) needs 2 tensors, got 1$"),
        (
            lambda x, y: TensorDataset(x[:, 0], y),
            r"^images: images must have shape \(B, C, H, W\), got \(12, 5, 4\); images must be",
        ),
        (lambda x, y: TensorDataset(x.long(), y), r"^images: image dtype torch.int64 is neither uint8 nor float"),
        (
            lambda x, y: TensorDataset(x.float() * 2, y),
            r"^images: float images must lie in \[0, 1\], got values in \[0, 510\]",
        ),
        (
            lambda x, y: TensorDataset(x.float().fill_(float("nan")), y),
            r"^images: images contain NaN or infinite values$",
        ),
        (
            lambda x, y: TensorDataset(x, y.float()),
            r"^TensorDataset: labels must be integer class indices, got dtype torch.float32$",
        ),
        (lambda x, y: Pairs([(x[0], 0, "extra")]), r"^item 0 is a tuple, not an \(image, label\) pair"),
        (lambda x, y: Pairs([{"image": x[0], "label": 0}]), r"^item 0 is a dict, not an \(image, label\) pair"),
        (lambda x, y: Pairs([(x[0], 0), (x[1], 1.0)]), r"^item 1: label must be an integer class index, got float$"),
        (lambda x, y: Pairs([(x[0], 0), ([[[1]]], 1)]), r"^item 1: got a list; images must be \(C, H, W\) tensors"),
        (
            lambda x, y: Pairs([(x[0], 0), (x[1, :, :2], 1)]),
            r"^images have different shapes \[\(3, 2, 4\), \(3, 5, 4\)\] \(C, H, W\)",
        ),
        (
            lambda x, y: DataLoader(TensorDataset(x, torch.nn.functional.one_hot(y)), batch_size=4),
            r"^item 0: labels must be class indices of shape \(B,\), got \(4, 4\)$",
        ),
        (lambda x, y: Pairs([]), r"^the dataset holds no examples$"),
    ],
)
def test_anything_else_is_one_clear_error(lattice, make, message):
    with pytest.raises(QRobustError, match=message) as error:
        as_lattice_dataset(make(*lattice))
    assert "\n" not in str(error.value)


def test_numpy_items_are_read():
    images = np.zeros((2, 1, 2, 2), dtype=np.uint8)
    images[1] = 255
    converted = as_lattice_dataset(Pairs([(images[0], np.int64(0)), (images[1], np.int64(1))]))
    assert converted.images.flatten().tolist() == [0] * 4 + [255] * 4
