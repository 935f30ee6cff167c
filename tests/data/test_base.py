"""LatticeDataset: shape and dtype validation, the float view, and seeded subsets and splits."""

from __future__ import annotations

import pytest
import torch

from qrobust.data import DatasetInfo, LatticeDataset, to_unit_interval

INFO = DatasetInfo("toy", (1, 4, 4), ("a", "b", "c"), (0.5,), (0.25,))


def test_num_classes():
    assert INFO.num_classes == 3


@pytest.mark.parametrize(
    ("images", "labels", "message"),
    [
        (torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.long), "must be a uint8 tensor"),
        (torch.zeros(2, 4, 4, dtype=torch.uint8), torch.zeros(2, dtype=torch.long), "of shape \\(2, 4, 4\\)"),
        (torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(3, dtype=torch.long), "labels must have shape"),
        (torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(2, 1, dtype=torch.long), "labels must have shape"),
        (torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.zeros(2, dtype=torch.long), "but toy expects"),
    ],
)
def test_validation(images, labels, message):
    with pytest.raises(ValueError, match=message):
        LatticeDataset(images, labels, INFO)


def test_floats(toy_dataset):
    floats = toy_dataset.floats()
    assert floats.dtype == torch.float32
    assert torch.equal(floats, toy_dataset.images.float() / 255)
    assert torch.equal(to_unit_interval(torch.tensor([0, 255], dtype=torch.uint8)), torch.tensor([0.0, 1.0]))
    assert toy_dataset.images.dtype == torch.uint8  # the view does not touch the lattice images


def test_select_keeps_the_given_order(toy_dataset):
    picked = toy_dataset.select([5, 2, 9])
    assert picked.images[:, 0, 0, 0].tolist() == [5, 2, 9]
    assert picked.labels.tolist() == [2, 2, 0]
    assert picked.info == toy_dataset.info


def test_subset(toy_dataset):
    subset = toy_dataset.subset(7, seed=1)
    ids = subset.images[:, 0, 0, 0].tolist()
    assert len(subset) == 7 and len(set(ids)) == 7
    assert ids == sorted(ids)  # original order kept
    assert subset.labels.tolist() == [i % 3 for i in ids]
    assert torch.equal(toy_dataset.subset(7, seed=1).images, subset.images)
    assert not torch.equal(toy_dataset.subset(7, seed=2).images, subset.images)
    assert torch.equal(toy_dataset.subset(20).images, toy_dataset.images)


@pytest.mark.parametrize("n", [0, -1, 21])
def test_subset_size_is_checked(toy_dataset, n):
    with pytest.raises(ValueError, match=f"subset size must be in \\[1, 20\\], got {n}"):
        toy_dataset.subset(n)


def test_split(toy_dataset):
    first, rest = toy_dataset.split(0.3, seed=4)
    first_ids, rest_ids = first.images[:, 0, 0, 0].tolist(), rest.images[:, 0, 0, 0].tolist()
    assert (len(first), len(rest)) == (6, 14)
    assert sorted(first_ids + rest_ids) == list(range(20))
    assert first_ids == sorted(first_ids) and rest_ids == sorted(rest_ids)
    again, _ = toy_dataset.split(0.3, seed=4)
    assert torch.equal(again.images, first.images)
    other, _ = toy_dataset.split(0.3, seed=5)
    assert not torch.equal(other.images, first.images)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.5, 1.5])
def test_split_fraction_is_checked(toy_dataset, fraction):
    with pytest.raises(ValueError, match=f"split fraction must be in \\(0, 1\\), got {fraction}"):
        toy_dataset.split(fraction)
