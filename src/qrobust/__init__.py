"""qrobust: small, fast and provably robust neural networks.

The main path, importable as ``import qrobust as qr``::

    train_set = qr.load_dataset("mnist", "train")            # or qr.as_lattice_dataset / load_image_folder / load_npz
    qr.train(model, train_set, qr.TrainConfig(epochs=5, sigma=0.25), device="auto")
    qat = qr.prepare(model, example)                          # quantization-aware twin (prepare_qat)
    qr.calibrate(qat, calibration_images); int8 = qr.convert(qat)
    smoothed = qr.SmoothedClassifier(int8, 10, qr.IntRS(0.25))
    certificate = smoothed.certify(image, n0=100, n=10_000, alpha=0.001)
    x_adv = qr.PGD(model, eps=8 / 255, step_size=2 / 255, steps=10)(x, y)
    ok = qr.certify(qr.ReluNetwork.from_model(mlp), images, labels, qr.WeightPerturbation((2,), 1e-3))

Data: ``load_dataset``, ``as_lattice_dataset``, ``load_image_folder``, ``load_npz``; models:
``build_model``, ``trace``, ``check_supported``; training: ``train``, ``accuracy``, ``TrainConfig``;
int8: ``prepare`` (= ``prepare_qat``), ``calibrate``, ``convert``, ``fast_backend``, ``save_int8``,
``load_int8``; randomized smoothing: ``SmoothedClassifier`` with ``FloatRS``, ``FloatRSQuant``,
``IntRS``, ``LatticeRS``; attacks: ``FGSM``, ``PGD``, ``CarliniWagnerL2``, ``evaluate_attacks``;
weight bounds: ``ReluNetwork``, ``WeightPerturbation``, ``certify``, ``certified_eps``,
``verify_quantization``; devices: ``resolve_device``; errors: ``QRobustError``.

The names load on first use (PEP 562), so ``import qrobust`` stays light (no torch) for the command line.
``qrobust.train`` is the training subpackage, callable as its function ``train``.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> (module, attribute in it; None: the module itself)
_EXPORTS: dict[str, tuple[str, str | None]] = {
    "load_dataset": ("qrobust.data", "load_dataset"),
    "as_lattice_dataset": ("qrobust.data", "as_lattice_dataset"),
    "load_image_folder": ("qrobust.data", "load_image_folder"),
    "load_npz": ("qrobust.data", "load_npz"),
    "build_model": ("qrobust.models", "build_model"),
    "trace": ("qrobust.graph", "trace"),
    "check_supported": ("qrobust.graph", "check_supported"),
    "train": ("qrobust.train", None),  # the subpackage itself, callable as qrobust.train.loop.train
    "accuracy": ("qrobust.train", "accuracy"),
    "TrainConfig": ("qrobust.train", "TrainConfig"),
    "prepare": ("qrobust.quant", "prepare_qat"),
    "prepare_qat": ("qrobust.quant", "prepare_qat"),
    "calibrate": ("qrobust.quant", "calibrate"),
    "convert": ("qrobust.quant", "convert"),
    "fast_backend": ("qrobust.quant", "fast_backend"),
    "save_int8": ("qrobust.quant", "save_int8"),
    "load_int8": ("qrobust.quant", "load_int8"),
    "SmoothedClassifier": ("qrobust.smoothing", "SmoothedClassifier"),
    "FloatRS": ("qrobust.smoothing", "FloatRS"),
    "FloatRSQuant": ("qrobust.smoothing", "FloatRSQuant"),
    "IntRS": ("qrobust.smoothing", "IntRS"),
    "LatticeRS": ("qrobust.smoothing", "LatticeRS"),
    "FGSM": ("qrobust.attacks", "FGSM"),
    "PGD": ("qrobust.attacks", "PGD"),
    "CarliniWagnerL2": ("qrobust.attacks", "CarliniWagnerL2"),
    "evaluate_attacks": ("qrobust.attacks", "evaluate_attacks"),
    "ReluNetwork": ("qrobust.bounds", "ReluNetwork"),
    "WeightPerturbation": ("qrobust.bounds", "WeightPerturbation"),
    "certify": ("qrobust.bounds", "certify"),
    "certified_eps": ("qrobust.bounds", "certified_eps"),
    "verify_quantization": ("qrobust.bounds", "verify_quantization"),
    "resolve_device": ("qrobust.devices", "resolve_device"),
    "QRobustError": ("qrobust.errors", "QRobustError"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import the submodule that holds ``name`` on first use and cache the name here."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'qrobust' has no attribute {name!r}")
    module, attribute = _EXPORTS[name]
    value = importlib.import_module(module)
    if attribute is not None:
        value = getattr(value, attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
