"""Training: one loop with SGD, step learning rate, noise augmentation, checkpoints and resume."""

from qrobust.train.loop import EpochStats, TrainConfig, accuracy, train
from qrobust.train.restore import load_model

__all__ = ["EpochStats", "TrainConfig", "accuracy", "load_model", "train"]
