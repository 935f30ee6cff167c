"""Datasets on the uint8 input lattice: loaders from local files, your own data, and training augmentation.

Named datasets come from ``load_dataset(name, split)``; your own from ``load_image_folder`` (class
sub-folders of PNG/JPEG images), ``load_npz`` (``images`` and ``labels`` arrays) or, for any map-style
PyTorch ``Dataset`` or ``DataLoader`` of (image, label), ``as_lattice_dataset``. Load the test split
with ``info=train_set.info`` so both share classes, shape and normalisation statistics.
"""

from qrobust.data.augment import augmentation_for, random_crop_flip
from qrobust.data.base import DatasetInfo, LatticeDataset, channel_stats, dataset_from_lattice, to_unit_interval
from qrobust.data.convert import as_lattice_dataset
from qrobust.data.files import load_image_folder, load_npz
from qrobust.data.loaders import DATASET_NAMES, dataset_info, load_dataset

__all__ = [
    "DATASET_NAMES",
    "DatasetInfo",
    "LatticeDataset",
    "as_lattice_dataset",
    "augmentation_for",
    "channel_stats",
    "dataset_from_lattice",
    "dataset_info",
    "load_dataset",
    "load_image_folder",
    "load_npz",
    "random_crop_flip",
    "to_unit_interval",
]
