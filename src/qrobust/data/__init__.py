"""Datasets on the uint8 input lattice: loaders from local files, and training augmentation."""

from qrobust.data.augment import augmentation_for, random_crop_flip
from qrobust.data.base import DatasetInfo, LatticeDataset, to_unit_interval
from qrobust.data.loaders import DATASET_NAMES, dataset_info, load_dataset

__all__ = [
    "DATASET_NAMES",
    "DatasetInfo",
    "LatticeDataset",
    "augmentation_for",
    "dataset_info",
    "load_dataset",
    "random_crop_flip",
    "to_unit_interval",
]
