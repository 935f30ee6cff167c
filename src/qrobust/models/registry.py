"""Build models by name: the built-in ones, those registered with ``register_model``, those an installed
package adds under the ``qrobust.models`` entry-point group, and ``package.module:factory`` functions the
user names explicitly (``import_model``).

A name read from a file is only ever looked up, never imported: a checkpoint naming an unregistered
factory fails with one line, so a crafted file cannot run code.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from importlib.metadata import entry_points

from torch import nn

from qrobust.data.base import DatasetInfo
from qrobust.errors import QRobustError
from qrobust.models.cnn import CNN
from qrobust.models.enresnet import DEFAULT_NOISE_COEF, EnResNet
from qrobust.models.mlp import MLP
from qrobust.models.mobilenet import MobileNetV2
from qrobust.models.resnet import CifarResNet

ENTRY_POINT_GROUP = "qrobust.models"
Factory = Callable[..., nn.Module]


def _resnet(depth: int) -> Callable[[DatasetInfo], CifarResNet]:
    """The builder of the CIFAR ResNet of this depth; it takes no options."""

    def build(info: DatasetInfo) -> CifarResNet:
        return CifarResNet(info, depth=depth)

    return build


def _enresnet(depth: int) -> Callable[..., EnResNet]:
    """The builder of En_n ResNets of this depth; ``members`` and ``noise_coef`` are its options."""

    def build(info: DatasetInfo, members: int = 1, noise_coef: float = DEFAULT_NOISE_COEF) -> EnResNet:
        return EnResNet(info, depth=depth, members=members, noise_coef=noise_coef)

    return build


# Each factory takes ``info`` first; its other keyword arguments are the model's options.
# resnet8 / enresnet8 (one block per stage) are the small variants, quick to train on a CPU.
_BUILTINS: dict[str, Factory] = {
    "mlp": MLP,
    "cnn": CNN,
    **{f"resnet{depth}": _resnet(depth) for depth in (8, 20, 32, 44, 56, 110)},
    **{f"enresnet{depth}": _enresnet(depth) for depth in (8, 20, 56, 110)},
    "mobilenetv2": MobileNetV2,
}
_REGISTERED: dict[str, Factory] = {}


def register_model(name: str, factory: Factory) -> None:
    """Make ``factory`` buildable as ``build_model(name, info, **options)`` and by checkpoints naming ``name``.

    ``factory(info, **options)`` returns a model mapping (N, C, H, W) floats in [0, 1] to logits
    (N, num_classes); its keyword arguments are the options checkpoints record. Registering the same
    factory twice is a no-op; a name taken by another factory raises QRobustError.
    """
    if not isinstance(name, str) or not name.strip():
        raise QRobustError(f"a model name must be a non-empty string, got {name!r}")
    if not callable(factory):
        raise QRobustError(f"the factory of model {name!r} must be callable, got {type(factory).__name__}")
    taken = _BUILTINS.get(name) or _REGISTERED.get(name)
    if taken is not None and taken is not factory:
        raise QRobustError(f"model name {name!r} is taken by {factory_path(taken)}")
    _REGISTERED[name] = factory


def import_model(spec: str) -> str:
    """Import the factory ``package.module:function`` that the user named (e.g. ``--model``), register it
    under ``spec`` and return ``spec``."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute.isidentifier():
        raise QRobustError(f"a model factory must look like package.module:function, got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise QRobustError(f"cannot import {module_name!r} for model {spec!r}: {error}") from None
    if not hasattr(module, attribute):
        raise QRobustError(f"module {module_name!r} has no {attribute!r} for model {spec!r}")
    register_model(spec, getattr(module, attribute))
    return spec


def model_names() -> list[str]:
    """The buildable model names: built-in, registered, then installed entry points."""
    installed = [point.name for point in entry_points(group=ENTRY_POINT_GROUP)]
    return list(dict.fromkeys([*_BUILTINS, *_REGISTERED, *installed]))


def is_builtin(name: str) -> bool:
    """Whether ``name`` is one of qrobust's own models."""
    return name in _BUILTINS


def factory_path(factory: Factory) -> str:
    """``module:qualified_name`` of ``factory``, for metadata and messages."""
    return f"{getattr(factory, '__module__', '?')}:{getattr(factory, '__qualname__', repr(factory))}"


def find_factory(name: str) -> Factory | None:
    """The factory of ``name`` (loading an installed entry point of that name), or None if there is none."""
    factory = _BUILTINS.get(name) or _REGISTERED.get(name)
    if factory is not None:
        return factory
    for point in entry_points(group=ENTRY_POINT_GROUP):
        if point.name == name:
            try:
                register_model(name, point.load())
            except ImportError as error:
                raise QRobustError(
                    f"cannot load model {name!r} of the installed entry point {point.value}: {error}"
                ) from None
            return _REGISTERED[name]
    return None


def get_factory(name: str) -> Factory:
    """The factory of ``name``; QRobustError naming the valid names if there is none."""
    factory = find_factory(name)
    if factory is None:
        raise QRobustError(
            f"unknown model {name!r}; valid names: {', '.join(model_names())}, "
            "or a function of your own as package.module:function"
        )
    return factory


def build_model(name: str, info: DatasetInfo, **options: object) -> nn.Module:
    """A freshly initialised model ``name`` for inputs described by ``info``.

    Args:
        name: one of ``model_names()``, or a name given to ``register_model`` or ``import_model``.
        info: the dataset the model reads (input shape, statistics, number of classes).
        **options: the model's own options, e.g. ``depth`` and ``width`` for ``"mlp"``,
            ``members`` and ``noise_coef`` for ``"enresnet20"``, ``width_mult`` for ``"mobilenetv2"``.

    Returns a model mapping (N, C, H, W) floats in [0, 1] to logits (N, num_classes).
    Raises ValueError for an unknown name, an unknown option, or an invalid option value.
    """
    factory = get_factory(name)
    allowed = list(inspect.signature(factory).parameters)[1:]  # everything after ``info``
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        accepted = ", ".join(allowed) if allowed else "none"
        raise QRobustError(
            f"unknown option(s) {', '.join(map(repr, unknown))} for model {name!r}; accepted options: {accepted}"
        )
    return factory(info, **options)


def count_parameters(model: nn.Module) -> int:
    """The number of trainable parameters (``requires_grad``) in ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
