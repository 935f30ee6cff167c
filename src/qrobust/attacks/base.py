"""What every attack shares: input checks, the input gradient, the gradient-masking warning, evaluation mode.

An attack is configured once with its model and hyperparameters and then called on batches,
``x_adv = PGD(model, eps=8 / 255, step_size=2 / 255, steps=10)(x, y)``. Perturbations live in [0, 1]
pixel space, since every model normalises its input in its first layer.
"""

from __future__ import annotations

import abc
import contextlib
import math
import warnings
from collections.abc import Callable, Iterator

import torch
from torch import nn

from qrobust.devices import module_device


class GradientMaskingWarning(UserWarning):
    """The model's input gradient is exactly zero, so a gradient attack on it measures nothing."""


class Attack(abc.ABC):
    """An adversarial attack on ``model``, a map from float images (N, C, H, W) in [0, 1] to logits (N, K).

    Calling it returns adversarial examples, detached, of the shape of ``x`` and in [0, 1]. The model
    runs in evaluation mode during the attack (no BatchNorm or quantization-range updates, no dropout)
    and gets every submodule's own mode back afterwards; gradients are taken w.r.t. the input only, so
    the parameters' ``.grad`` stay as they were. The attack runs on the model's device (that of its
    first parameter or buffer; the CPU for a model without any) and returns the examples on ``x``'s.
    """

    def __init__(self, model: nn.Module) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self._warned_masking = False

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Adversarial examples for images ``x`` (N, C, H, W) in [0, 1] and labels (or targets) ``y`` (N, ...)."""
        check_batch(x, y)
        # Gradients are needed even when called under no_grad or inference_mode; cloning there turns
        # inference tensors into ordinary ones autograd accepts.
        device = module_device(self.model)
        with evaluation_mode(self.model), torch.inference_mode(False), torch.enable_grad():
            x_adv = self._perturb(x.detach().to(device, copy=True), y.detach().to(device, copy=True))
            return x_adv.detach().to(x.device)

    @abc.abstractmethod
    def _perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The attack proper, on checked and detached inputs, with the model in evaluation mode."""

    @abc.abstractmethod
    def hyperparameters(self) -> dict[str, object]:
        """The attack's settings by name, in signature order (what ``repr`` shows)."""

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={_describe(value)}" for name, value in self.hyperparameters().items())
        return f"{type(self).__name__}({fields})"

    def _input_gradient(
        self, x: torch.Tensor, objective: Callable[[torch.Tensor], torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The logits (N, K) at ``x`` and the gradient of the scalar ``objective(logits)`` w.r.t. ``x`` only.

        A model whose output does not depend differentiably on ``x`` (an int8 model behind
        ``LatticeInputs``, a detached input) has gradient zero.
        """
        x = x.detach().requires_grad_(True)
        logits = self.model(x)
        value = objective(logits)
        if value.dim() != 0:
            raise ValueError(f"the attack objective must be a scalar, got shape {tuple(value.shape)}")
        if not value.requires_grad:
            return logits.detach(), torch.zeros_like(x)
        (grad,) = torch.autograd.grad(value, x, allow_unused=True, materialize_grads=True)
        return logits.detach(), grad

    def _check_gradient(self, grad: torch.Tensor, among: torch.Tensor | None = None) -> None:
        """Warn once per attack when ``grad`` (N, ...) is exactly zero for most examples (``among`` those
        whose objective is not saturated): the attack then has no signal and its accuracy means nothing."""
        zero = grad.flatten(1).abs().amax(1) == 0  # (N,)
        if among is not None:
            zero = zero[among]
        if self._warned_masking or zero.numel() == 0 or zero.float().mean() <= 0.5:
            return
        self._warned_masking = True
        warnings.warn(
            f"{type(self).__name__}: the input gradient of {type(self.model).__name__} is exactly zero for "
            f"{zero.float().mean().item():.0%} of the batch, so the attack has no signal (gradient masking, "
            f"e.g. rounding without a straight-through estimator or an int8 model) and the accuracy under it "
            f"overstates robustness; attack a differentiable twin (the QAT or float model) and evaluate the "
            f"transferred examples instead",
            GradientMaskingWarning,
            stacklevel=2,
        )


def check_batch(x: torch.Tensor, y: torch.Tensor) -> None:
    """Raise ValueError unless ``x`` is a finite float (N, C, H, W) batch in [0, 1] and ``y`` has N rows."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() != 4:
        raise ValueError(f"x must be a float tensor of shape (N, C, H, W), got {_tensor_kind(x)}")
    if not torch.isfinite(x).all():
        raise ValueError("x contains NaN or infinite values")
    if x.numel() and (x.min() < 0 or x.max() > 1):
        raise ValueError(f"x must lie in [0, 1], got values in [{x.min().item():.3g}, {x.max().item():.3g}]")
    if not isinstance(y, torch.Tensor) or y.dim() == 0 or y.shape[0] != x.shape[0]:
        raise ValueError(f"y must have one row per image of x ({x.shape[0]}), got {_tensor_kind(y)}")
    if y.is_floating_point() and not torch.isfinite(y).all():
        raise ValueError("y contains NaN or infinite values")


def check_labels(y: torch.Tensor, num_classes: int) -> None:
    """Raise ValueError unless ``y`` is an int64 (N,) tensor of class indices in 0..num_classes - 1."""
    if y.dtype != torch.int64 or y.dim() != 1:
        raise ValueError(
            f"labels must be an int64 tensor of shape (N,), got {_tensor_kind(y)}; "
            f"pass a custom loss to attack with other targets"
        )
    if y.numel() and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"labels must be in 0..{num_classes - 1}, got {y.min().item()}..{y.max().item()}")


def check_real(name: str, value: object, *, positive: bool) -> float:
    """``value`` as a float; raise ValueError unless it is a finite number > 0 (``positive``) or >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be {'> 0' if positive else '>= 0'}, got {value!r}")
    return float(value)


def check_integer(name: str, value: object, minimum: int) -> int:
    """Raise ValueError unless ``value`` is an integer >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


@contextlib.contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[None]:
    """Run ``model`` in evaluation mode inside the block; give every submodule its own mode back after it."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _describe(value: object) -> str:
    """A hyperparameter for ``repr``: functions by name, everything else by its repr."""
    return value.__name__ if callable(value) and hasattr(value, "__name__") else repr(value)


def _tensor_kind(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"{value.dtype} of shape {tuple(value.shape)}"
    return type(value).__name__
