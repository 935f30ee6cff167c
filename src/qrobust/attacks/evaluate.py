"""Accuracy under attack: natural, white-box, and transfer (the attack's own model differs from the evaluated one)."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

import torch
from torch import nn

from qrobust.attacks.base import Attack, check_integer, evaluation_mode
from qrobust.data import to_unit_interval
from qrobust.devices import module_device
from qrobust.progress import progress_bar


def robust_accuracy(
    model: nn.Module,
    attack: Attack | None,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    batch_size: int = 256,
    progress: bool = False,
) -> float:
    """Top-1 accuracy of ``model`` on the adversarial examples ``attack`` makes for ``images``.

    ``attack`` carries its own source model: when that is ``model``, this is white-box robust accuracy;
    when it is another (a float or QAT twin of an int8 model), the accuracy of transferred examples.
    ``attack=None`` gives natural accuracy. See ``evaluate_attacks`` for the arguments.
    """
    name = "natural" if attack is None else type(attack).__name__
    results = evaluate_attacks(
        {"model": model}, {name: attack}, images, labels, batch_size=batch_size, progress=progress
    )
    return results["model"][name]


def evaluate_attacks(
    models: Mapping[str, nn.Module],
    attacks: Mapping[str, Attack | None],
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    batch_size: int = 256,
    progress: bool = False,
) -> dict[str, dict[str, float]]:
    """Top-1 accuracy of each model under each attack: ``{model name: {attack name: accuracy}}``.

    Each batch is attacked once (with gradients) and every model is evaluated on the same adversarial
    examples, so an fp32 or QAT source and its int8 twin are compared on identical inputs. Only the
    evaluated models' forward passes run under ``torch.inference_mode``, in evaluation mode (every
    submodule gets its own mode back afterwards). Each model runs on its own device (``module_device``),
    so a GPU source model and a CPU int8 twin can be compared.

    Args:
        models: name -> evaluated classifier, float images (N, C, H, W) in [0, 1] -> logits (N, K).
        attacks: name -> attack (``None``: clean images), in order; each carries its source model.
        images: uint8 lattice images or float images in [0, 1], (N, C, H, W), N >= 1.
        labels: int64 (N,) true classes.
        batch_size: images per attacked batch, >= 1.
        progress: show a progress bar per attack.
    """
    check_integer("batch_size", batch_size, 1)
    if not models:
        raise ValueError("models must name at least one model to evaluate")
    if images.dim() != 4 or len(images) == 0:
        raise ValueError(f"images must be a non-empty batch of shape (N, C, H, W), got shape {tuple(images.shape)}")
    if labels.dtype != torch.int64 or labels.shape != (len(images),):
        raise ValueError(
            f"labels must be int64 of shape ({len(images)},), got {labels.dtype} of shape {tuple(labels.shape)}"
        )
    for name, attack in attacks.items():
        if attack is not None and not isinstance(attack, Attack):
            raise ValueError(f"attack {name!r} must be an Attack or None, got {type(attack).__name__}")
    inputs = to_unit_interval(images) if images.dtype == torch.uint8 else images  # (N, C, H, W) float

    accuracies: dict[str, dict[str, float]] = {name: {} for name in models}
    with progress_bar(progress) as bar, contextlib.ExitStack() as modes:
        for model in models.values():
            modes.enter_context(evaluation_mode(model))
        for name, attack in attacks.items():
            task = bar.add_task(name, total=len(inputs), status="")
            correct = dict.fromkeys(models, 0)
            for start in range(0, len(inputs), batch_size):
                x, y = inputs[start : start + batch_size], labels[start : start + batch_size]
                x_adv = x if attack is None else attack(x, y)
                with torch.inference_mode():
                    for model_name, model in models.items():
                        device = module_device(model)
                        correct[model_name] += int((model(x_adv.to(device)).argmax(1) == y.to(device)).sum())
                done = start + len(x)
                bar.update(task, advance=len(x), status=" ".join(f"{100 * c / done:.1f}%" for c in correct.values()))
            for model_name, count in correct.items():
                accuracies[model_name][name] = count / len(inputs)
    return accuracies
