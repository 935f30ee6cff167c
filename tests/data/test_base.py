"""LatticeDataset: shape and dtype validation, the float view, seeded subsets and splits, and built infos."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qrobust.data import DatasetInfo, LatticeDataset, channel_stats, dataset_from_lattice, to_unit_interval
from qrobust.errors import QRobustError

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


# --- statistics and the info of your own data ------------------------------------------------------


def test_channel_stats_match_the_float_view():
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (7, 3, 5, 4), dtype=np.uint8))
    mean, std = channel_stats(images)
    floats = images.double() / 255
    assert mean == pytest.approx(floats.mean((0, 2, 3)).tolist(), abs=1e-12)
    assert std == pytest.approx(floats.std((0, 2, 3), correction=0).tolist(), abs=1e-12)


def test_dataset_from_lattice_computes_its_info_or_reuses_the_given_one(toy_dataset):
    made = dataset_from_lattice(toy_dataset.images, toy_dataset.labels.int(), source="mine")
    assert made.labels.dtype == torch.int64
    assert (made.info.name, made.info.shape, made.info.classes) == ("mine", (1, 4, 4), ("0", "1", "2"))
    assert made.info.mean == pytest.approx((9.5 / 255,))
    named = dataset_from_lattice(toy_dataset.images, toy_dataset.labels, source="mine", classes=["x", "y", "z", "w"])
    assert named.info.classes == ("x", "y", "z", "w")
    reused = dataset_from_lattice(toy_dataset.images[:3], toy_dataset.labels[:3], source="test", info=made.info)
    assert reused.info is made.info


@pytest.mark.parametrize(
    ("labels", "options", "message"),
    [
        (torch.zeros(20), {}, r"^mine: labels must be integer class indices, got dtype torch.float32$"),
        (
            torch.zeros(19, dtype=torch.long),
            {},
            r"^mine: labels must have shape \(20,\) to match the images, got \(19,\)$",
        ),
        (torch.arange(20) - 1, {}, r"^mine: labels must be in 0..18, got -1..18$"),
        (torch.arange(20) % 3, {"classes": ["a", "b"]}, r"^mine: labels must be in 0..1, got 0..2$"),
        (torch.arange(20) % 3, {"classes": ["a", "a", "b"]}, r"^mine: class names must be distinct"),
        (torch.arange(20) % 3, {"info": INFO, "classes": ["a"]}, r"^mine: classes \['a'\] differ from those of toy$"),
        (torch.arange(20) % 4, {"info": INFO}, r"^mine: labels must be in 0..2, got 0..3$"),
    ],
)
def test_dataset_from_lattice_refuses_bad_labels(toy_dataset, labels, options, message):
    with pytest.raises(QRobustError, match=message):
        dataset_from_lattice(toy_dataset.images, labels, source="mine", **options)


def test_dataset_from_lattice_refuses_other_shapes_constant_channels_and_nothing(toy_dataset):
    wide = torch.zeros(2, 1, 4, 5, dtype=torch.uint8)
    with pytest.raises(
        QRobustError, match=r"^mine: images have shape \(1, 4, 5\) \(C, H, W\), but toy has \(1, 4, 4\)$"
    ):
        dataset_from_lattice(wide, torch.zeros(2, dtype=torch.long), source="mine", info=INFO)
    with pytest.raises(QRobustError, match=r"^mine: channel 0 is constant \(std 0\)"):
        dataset_from_lattice(wide, torch.zeros(2, dtype=torch.long), source="mine")
    with pytest.raises(QRobustError, match=r"^mine holds no images$"):
        dataset_from_lattice(wide[:0], torch.zeros(0, dtype=torch.long), source="mine")
