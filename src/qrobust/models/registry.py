"""Build models by name: the one entry point the CLI and the workflows use."""

from __future__ import annotations

import inspect
from collections.abc import Callable

from torch import nn

from qrobust.data.base import DatasetInfo
from qrobust.models.cnn import CNN
from qrobust.models.enresnet import DEFAULT_NOISE_COEF, EnResNet
from qrobust.models.mlp import MLP
from qrobust.models.mobilenet import MobileNetV2
from qrobust.models.resnet import CifarResNet


def _resnet(depth: int) -> Callable[[DatasetInfo], CifarResNet]:
    """The builder of the CIFAR ResNet of this depth; it takes no options."""

    def build(info: DatasetInfo) -> CifarResNet:
        return CifarResNet(info, depth=depth)

    return build


def _enresnet(depth: int) -> Callable[..., EnResNet]:
    """The builder of En_n ResNets of this depth; ``members`` and ``noise_coef`` are its options."""

    def build(
        info: DatasetInfo, members: int = 1, noise_coef: float = DEFAULT_NOISE_COEF
    ) -> EnResNet:
        return EnResNet(info, depth=depth, members=members, noise_coef=noise_coef)

    return build


# Each builder takes ``info`` first; its other keyword arguments are the model's options.
# resnet8 / enresnet8 (one block per stage) are the small variants, quick to train on a CPU.
_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "mlp": MLP,
    "cnn": CNN,
    **{f"resnet{depth}": _resnet(depth) for depth in (8, 20, 32, 44, 56, 110)},
    **{f"enresnet{depth}": _enresnet(depth) for depth in (8, 20, 56, 110)},
    "mobilenetv2": MobileNetV2,
}


def model_names() -> list[str]:
    """The registered model names, in registration order."""
    return list(_BUILDERS)


def build_model(name: str, info: DatasetInfo, **options: object) -> nn.Module:
    """A freshly initialised model ``name`` for inputs described by ``info``.

    Args:
        name: one of ``model_names()``.
        info: the dataset the model reads (input shape, statistics, number of classes).
        **options: the model's own options, e.g. ``depth`` and ``width`` for ``"mlp"``,
            ``members`` and ``noise_coef`` for ``"enresnet20"``, ``width_mult`` for ``"mobilenetv2"``.

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
