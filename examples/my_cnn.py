"""A model of your own, defined outside qrobust: a function of the dataset's ``DatasetInfo`` whose keyword
arguments are the model's options. Name it on the command line as ``--model examples.my_cnn:my_cnn``
(with the repository root on PYTHONPATH), or in Python with ``qrobust.models.register_model``."""

from torch import nn

from qrobust.data import DatasetInfo
from qrobust.models import Normalize


def my_cnn(info: DatasetInfo, width: int = 16) -> nn.Module:
    """conv3x3(width)-ReLU-maxpool, then a linear classifier; [0, 1] images in, normalised first."""
    channels, height, columns = info.shape
    return nn.Sequential(
        Normalize(info.mean, info.std),
        nn.Conv2d(channels, width, 3, padding=1),  # (N, width, H, W)
        nn.ReLU(),
        nn.MaxPool2d(2),  # (N, width, H // 2, W // 2)
        nn.Flatten(),
        nn.Linear(width * (height // 2) * (columns // 2), info.num_classes),
    )
