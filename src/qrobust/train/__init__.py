"""Training: one loop with SGD, step learning rate, noise augmentation, checkpoints and resume."""

from qrobust.train.loop import EpochStats, TrainConfig, accuracy, train

__all__ = ["EpochStats", "TrainConfig", "accuracy", "train"]
