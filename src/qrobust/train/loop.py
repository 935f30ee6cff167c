"""One training loop: SGD with step learning rate, noise augmentation, pluggable losses, low-bit weights.

Noise augmentation at the smoothing sigma is what makes a base classifier useful for randomized
smoothing (Cohen et al., ICML 2019); the adversarial losses (PGD, TRADES, the trade-off loss) live in
``qrobust.train.losses``; BinaryConnect / Binary-Relax low-bit weights hook in through
``qrobust.quant.WeightQuantizer``. Every epoch ends in an atomic checkpoint that resumes exactly. The
defaults are the papers': lr 0.1, momentum 0.9, divided by 10 every 30 epochs.
"""

from __future__ import annotations

import json
import math
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from qrobust.data import LatticeDataset, as_lattice_dataset, augmentation_for, to_unit_interval
from qrobust.devices import generator_on, module_device, require_cpu, resolve_device
from qrobust.errors import CheckpointError, QRobustError
from qrobust.models.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from qrobust.outputs import exclusive_lock
from qrobust.progress import progress_bar
from qrobust.quant.backend import QuantizedBackend
from qrobust.quant.engine import Int8Model
from qrobust.quant.lowbit import METHODS as QUANT_METHODS
from qrobust.quant.lowbit import LowBitConfig, WeightQuantizer
from qrobust.smoothing import FloatRS, IntRS, SmoothingMethod
from qrobust.train.losses import LOSSES, AttackConfig, Objective, make_objective

NOISE_METHODS = {"gaussian": FloatRS, "discrete": IntRS}

Data = LatticeDataset | Dataset | DataLoader  # anything ``as_lattice_dataset`` takes


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of one training run.

    ``sigma`` is the std of the noise augmentation in [0, 1] units (0: none); ``noise`` picks its kind:
    "gaussian" (continuous, for FloatRS) or "discrete" (N_Z(0, (255 sigma)^2) on the uint8 lattice,
    unclipped, exactly what IntRS certifies with; an int8 model clips to its own input range).

    ``loss`` is one of natural (needs sigma 0), gaussian (natural loss on noisy inputs, needs sigma > 0;
    the default picks one of these two from sigma), pgd, trades (weight ``beta``) or tradeoff
    (``alpha`` * natural + ``beta`` * PGD loss); the adversaries are l_inf PGD with ``eps``, ``step_size`` and ``attack_steps`` in [0, 1] pixel units.
    ``quant`` "bc" or "br" trains ``bits``-bit weights by BinaryConnect or Binary-Relax (lambda grows
    by ``rho`` each epoch until ``cutoff_epoch``, then pure projection).
    """

    epochs: int = 90
    batch_size: int = 256
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    lr_step: int = 30  # epochs between learning-rate drops
    lr_gamma: float = 0.1  # factor of each drop
    sigma: float = 0.0
    noise: str = "gaussian"
    augment: bool = True  # the dataset's standard augmentation, if it has one (crop + flip for CIFAR)
    seed: int = 0
    loss: str | None = None
    alpha: float = 1.0
    beta: float = 1.0
    eps: float = 0.031
    step_size: float = 0.007
    attack_steps: int = 10
    quant: str = "none"
    bits: int = 1
    rho: float = LowBitConfig.rho
    cutoff_epoch: int = LowBitConfig.cutoff_epoch

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "lr_step", "attack_steps", "bits"):
            if int(getattr(self, name)) != getattr(self, name) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        for name in ("lr", "lr_gamma", "eps", "step_size"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("momentum", "weight_decay", "sigma", "alpha", "beta"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.noise not in NOISE_METHODS:
            raise ValueError(f"noise must be one of {', '.join(NOISE_METHODS)}, got {self.noise!r}")
        if self.loss is None:
            object.__setattr__(self, "loss", self.resolved_loss)
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.loss == "natural" and self.sigma > 0:
            raise ValueError("loss 'natural' trains on clean inputs: use loss 'gaussian' for noise augmentation")
        if self.loss == "gaussian" and self.sigma == 0:
            raise ValueError("loss 'gaussian' needs a noise level sigma > 0")
        if self.quant not in ("none", *QUANT_METHODS):
            raise ValueError(f"quant must be one of none, {', '.join(QUANT_METHODS)}, got {self.quant!r}")
        self.lowbit()  # validates bits, rho and cutoff_epoch

    def noise_method(self) -> SmoothingMethod | None:
        """The smoothing method whose noise augments training, or None when sigma is 0."""
        return NOISE_METHODS[self.noise](self.sigma) if self.sigma > 0 else None

    @property
    def resolved_loss(self) -> str:
        """The loss name, with the default (gaussian when sigma > 0, else natural) filled in."""
        return self.loss or ("gaussian" if self.sigma > 0 else "natural")

    def objective(self) -> Objective:
        """The training loss with its adversary."""
        attack = AttackConfig(self.eps, self.step_size, self.attack_steps)
        return make_objective(self.resolved_loss, alpha=self.alpha, beta=self.beta, attack=attack)

    def lowbit(self) -> LowBitConfig | None:
        """The low-bit weight training, or None for float weights."""
        return None if self.quant == "none" else LowBitConfig(self.bits, self.quant, self.rho, self.cutoff_epoch)

    def weight_quantizer(self, model: nn.Module) -> WeightQuantizer | None:
        """The BinaryConnect / Binary-Relax hook for ``model``, or None for float weights."""
        lowbit = self.lowbit()
        return None if lowbit is None else WeightQuantizer(model, **asdict(lowbit))


CHANCE_FACTOR = 1.2  # training accuracy at most this times 1 / classes two epochs running: warn that nothing is learnt
# (one such epoch is common at the start of adversarial training)


@dataclass(frozen=True)
class EpochStats:
    """One finished epoch: training loss and accuracy on the (noisy) batches, clean test accuracy if measured."""

    epoch: int
    lr: float
    loss: float
    accuracy: float
    test_accuracy: float | None
    seconds: float


def train(
    model: nn.Module,
    train_set: Data,
    config: TrainConfig,
    *,
    test_set: Data | None = None,
    checkpoint_path: str | Path | None = None,
    metadata: dict[str, Any] | None = None,
    resume: bool = False,
    progress: bool = True,
    device: torch.device | str | None = None,
) -> list[EpochStats]:
    """Train ``model`` in place and return the history of all epochs (including resumed ones).

    After every epoch the model, optimizer, scheduler and random state go to ``checkpoint_path``
    (atomically, with ``metadata``), so ``resume=True`` continues an interrupted run exactly where
    its last finished epoch left it. ``train_set`` and ``test_set`` may be plain PyTorch datasets or
    DataLoaders of (image, label), converted once by ``qrobust.data.as_lattice_dataset`` (the test set
    with the training set's info); batches come from ``config``.

    ``device`` ("auto", "cpu", "cuda", "mps" or a ``torch.device``; default: where ``model``'s parameters
    are) is where the model is moved and trained, batches and noise included. Shuffling and augmentation
    draw from a CPU generator seeded by ``config.seed``; on the CPU the noise and the adversaries draw
    from the same one (so a CPU run is what it always was), on an accelerator from a generator on the
    device with the same seed. A seeded run is reproducible on the same kind of device, not across them.
    """
    lock = nullcontext() if checkpoint_path is None else exclusive_lock(Path(checkpoint_path), "checkpoint")
    with lock:  # a second run on the same checkpoint refuses instead of interleaving epochs
        train_set = as_lattice_dataset(train_set)
        test_set = None if test_set is None else as_lattice_dataset(test_set, info=train_set.info)
        device = module_device(model) if device is None else resolve_device(device)
        model.to(device)
        generator = torch.Generator().manual_seed(config.seed)  # shuffling and augmentation
        device_generator = generator if device.type == "cpu" else torch.Generator(device).manual_seed(config.seed)
        optimizer = torch.optim.SGD(
            model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=config.lr_step, gamma=config.lr_gamma)
        quantizer = config.weight_quantizer(model)
        history: list[EpochStats] = []
        if resume and checkpoint_path is not None and Path(checkpoint_path).exists():
            checkpoint = load_checkpoint(checkpoint_path)
            history = _restore(checkpoint, model, optimizer, scheduler, generator, quantizer, config)
            if device_generator is not generator and "device_generator" in checkpoint.training_state:
                device_generator.set_state(checkpoint.training_state["device_generator"])
            if len(history) > config.epochs:
                raise ValueError(f"cannot resume to {config.epochs} epochs: the checkpoint already has {len(history)}")

        augmentation = augmentation_for(train_set.info) if config.augment else None
        noise = config.noise_method()
        objective = config.objective()
        quantized = quantizer.applied if quantizer is not None else nullcontext
        batches = math.ceil(len(train_set) / config.batch_size)
        with progress_bar(progress) as bar:
            task = bar.add_task("train", total=(config.epochs - len(history)) * batches, status="")
            for epoch in range(len(history) + 1, config.epochs + 1):
                started = time.perf_counter()
                model.train()
                loss_sum, correct, seen = 0.0, 0.0, 0
                order = torch.randperm(len(train_set), generator=generator)
                for start in range(0, len(train_set), config.batch_size):
                    index = order[start : start + config.batch_size]
                    images, labels = train_set.images[index], train_set.labels[index]  # (B, C, H, W) uint8, (B,)
                    if augmentation is not None:
                        images = augmentation(images, generator)
                    images, labels = images.to(device), labels.to(device)
                    with quantized():  # low-bit weights for forward and backward, float ones for the update
                        inputs = model_inputs(images, noise, device_generator)
                        loss, logits = objective(model, inputs, labels, device_generator)
                        optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                    optimizer.step()
                    loss_sum += loss.item() * len(index)
                    correct += (logits.argmax(1) == labels).sum().item()
                    seen += len(index)
                    bar.update(
                        task,
                        advance=1,
                        status=f"epoch {epoch}/{config.epochs} loss {loss_sum / seen:.3f} acc {correct / seen:.3f}",
                    )
                lr = float(scheduler.get_last_lr()[0])
                scheduler.step()
                if quantizer is not None:
                    quantizer.end_epoch()
                with quantized():
                    test_accuracy = accuracy(model, test_set, device=device) if test_set is not None else None
                history.append(
                    EpochStats(epoch, lr, loss_sum / seen, correct / seen, test_accuracy, time.perf_counter() - started)
                )
                classes = train_set.info.num_classes
                if len(history) >= 2 and all(stats.accuracy <= CHANCE_FACTOR / classes for stats in history[-2:]):
                    warnings.warn(
                        f"epochs {epoch - 1}-{epoch}: training accuracy {history[-2].accuracy:.3f}, "
                        f"{history[-1].accuracy:.3f} is at chance level ({classes} classes): the model is not "
                        f"learning; a smaller learning rate usually helps",
                        stacklevel=2,
                    )
                if progress:
                    bar.console.log(_describe(history[-1]))
                if checkpoint_path is not None:
                    training_state = {
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "generator": generator.get_state(),
                        "history": json.dumps([asdict(stats) for stats in history]),
                    }
                    if device_generator is not generator:
                        training_state["device_generator"] = device_generator.get_state()
                    if quantizer is not None:
                        training_state["quantizer"] = quantizer.state_dict()
                    state = model.state_dict() if quantizer is None else quantizer.projected_state_dict()
                    save_checkpoint(
                        checkpoint_path,
                        Checkpoint(
                            {k: v.detach().clone() for k, v in state.items()},
                            {**(metadata or {}), "train_config": asdict(config), "epochs_done": epoch},
                            training_state,
                        ),
                    )
        if quantizer is not None:
            quantizer.finalize()
        model.eval()
        return history


@torch.inference_mode()
def accuracy(
    model: nn.Module,
    dataset: Data,
    *,
    noise: SmoothingMethod | None = None,
    generator: torch.Generator | None = None,
    batch_size: int = 1000,
    device: torch.device | str | None = None,
) -> float:
    """Top-1 accuracy of ``model`` on ``dataset``, on clean inputs or with one draw of ``noise`` per image.

    ``model`` may be a float or fake-quantized model (fed [0, 1] floats) or an int8 one (``Int8Model``,
    its fast backend, an int8 ONNX model: fed integer lattice values, see ``reads_lattice``);
    ``dataset`` anything ``qrobust.data.as_lattice_dataset`` takes. Batches run on ``device`` (default:
    where ``model``'s parameters are; the model is not moved), the noise drawn there (from a generator on
    the device derived from ``generator`` if that lives elsewhere); int8 models run on the CPU only.
    """
    dataset = as_lattice_dataset(dataset)
    lattice = reads_lattice(model)
    device = module_device(model) if device is None else resolve_device(device)
    if lattice:
        require_cpu(device, "an int8 model")
    generator = generator_on(device, generator)
    model.eval()
    correct = 0
    for start in range(0, len(dataset), batch_size):
        images = dataset.images[start : start + batch_size].to(device)
        inputs = model_inputs(images, noise, generator, lattice=lattice)
        labels = dataset.labels[start : start + batch_size].to(device)
        correct += (model(inputs).argmax(1) == labels).sum().item()
    return correct / len(dataset)


def reads_lattice(model: nn.Module) -> bool:
    """Whether ``model`` reads integer lattice values (the int8 engines) rather than floats in [0, 1]."""
    if isinstance(model, (Int8Model, QuantizedBackend)):
        return True
    export = sys.modules.get(
        "qrobust.quant.export"
    )  # an ONNX model exists only once its (onnx-heavy) module is imported
    return export is not None and isinstance(model, export.OnnxRuntimeModel) and model.lattice


def model_inputs(
    images: torch.Tensor, noise: SmoothingMethod | None, generator: torch.Generator | None, *, lattice: bool = False
) -> torch.Tensor:
    """Model inputs from uint8 images, with the smoothing method's noise if one is given.

    By default float [0, 1] values: methods that feed int8 models return noisy integer lattice values
    (unclipped), whose float view v / 255 is what a quantization-aware model trains on (its input
    quantizer clips). With ``lattice`` (for an int8 model), integer lattice values, which only clean
    images and the lattice methods (IntRS, FloatRSQuant) give.
    """
    inputs = images if noise is None else noise.perturb(images, generator)
    if not lattice:
        return inputs if inputs.is_floating_point() else to_unit_interval(inputs)
    if inputs.is_floating_point():
        raise QRobustError(
            f"an int8 model reads integer lattice values, but {noise} noise gives floats: use IntRS or FloatRSQuant"
        )
    return inputs


def _restore(
    checkpoint: Checkpoint, model, optimizer, scheduler, generator, quantizer, config: TrainConfig
) -> list[EpochStats]:
    """Load the training state of an interrupted run; its config must match this one but for ``epochs``.

    Fields a checkpoint lacks predate them and count as equal.
    """
    saved = checkpoint.metadata.get("train_config")
    state = checkpoint.training_state
    if saved is None or not state:
        raise CheckpointError("cannot resume: the checkpoint holds no training state")
    differences = sorted(k for k, v in asdict(config).items() if k != "epochs" and saved.get(k, v) != v)
    if differences:
        raise CheckpointError(f"cannot resume: the checkpoint was trained with different {', '.join(differences)}")
    model.load_state_dict(checkpoint.state_dict)
    if quantizer is not None:
        quantizer.load_state_dict(state["quantizer"])  # the float shadow weights, over the projected ones
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    generator.set_state(state["generator"])
    return [EpochStats(**stats) for stats in json.loads(state["history"])]


def _describe(stats: EpochStats) -> str:
    test = f"  test acc {stats.test_accuracy:.4f}" if stats.test_accuracy is not None else ""
    return f"epoch {stats.epoch}  lr {stats.lr:.4g}  loss {stats.loss:.4f}  train acc {stats.accuracy:.4f}{test}  ({stats.seconds:.1f}s)"
