"""Training: one loop with SGD, step learning rate, noise augmentation, checkpoints and resume.

The package is callable as its main function: ``qrobust.train(model, data, config)`` is
``qrobust.train.loop.train(model, data, config)``, so ``import qrobust as qr; qr.train(...)`` works
while ``qrobust.train`` stays an ordinary package for imports (``import qrobust.train.loop``).
"""

import inspect
import sys
import types
from typing import Any

from qrobust.train.loop import EpochStats, TrainConfig, accuracy, train
from qrobust.train.restore import load_model

__all__ = ["EpochStats", "TrainConfig", "accuracy", "load_model", "train"]
__signature__ = inspect.signature(train)


class _CallablePackage(types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> list[EpochStats]:
        return train(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
