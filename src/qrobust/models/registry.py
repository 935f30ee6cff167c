"""Build models by name: the one entry point the CLI and the workflows use."""

from __future__ import annotations

import inspect
from collections.abc import Callable

from torch import nn

from qrobust.data.base import DatasetInfo
from qrobust.models.cnn import CNN
from qrobust.models.mlp import MLP
from qrobust.models.resnet import CifarResNet


def _resnet20(info: DatasetInfo) -> CifarResNet:
    return CifarResNet(info, depth=20)


def _resnet32(info: DatasetInfo) -> CifarResNet:
    return CifarResNet(info, depth=32)


def _resnet44(info: DatasetInfo) -> CifarResNet:
    return CifarResNet(info, depth=44)


def _resnet56(info: DatasetInfo) -> CifarResNet:
    return CifarResNet(info, depth=56)


def _resnet110(info: DatasetInfo) -> CifarResNet:
    return CifarResNet(info, depth=110)


# Each builder takes ``info`` first; its other keyword arguments are the model's options.
_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "mlp": MLP,
    "cnn": CNN,
    "resnet20": _resnet20,
    "resnet32": _resnet32,
    "resnet44": _resnet44,
    "resnet56": _resnet56,
    "resnet110": _resnet110,
}


def model_names() -> list[str]:
    """The registered model names, in registration order."""
    return list(_BUILDERS)


def build_model(name: str, info: DatasetInfo, **options: object) -> nn.Module:
    """A freshly initialised model ``name`` for inputs described by ``info``.

    Args:
        name: one of ``model_names()``.
        info: the dataset the model reads (input shape, statistics, number of classes).
        **options: the model's own options, e.g. ``depth`` and ``width`` for ``"mlp"``.

    Returns a model mapping (N, C, H, W) floats in [0, 1] to logits (N, num_classes).
    Raises ValueError for an unknown name, an unknown option, or an invalid option value.
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(_BUILDERS)}")
    builder = _BUILDERS[name]
    allowed = list(inspect.signature(builder).parameters)[1:]  # everything after ``info``
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        accepted = ", ".join(allowed) if allowed else "none"
        raise ValueError(
            f"unknown option(s) {', '.join(map(repr, unknown))} for model {name!r}; "
            f"accepted options: {accepted}"
        )
    return builder(info, **options)


def count_parameters(model: nn.Module) -> int:
    """The number of trainable parameters (``requires_grad``) in ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
