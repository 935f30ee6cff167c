"""Rebuild the model of a training checkpoint: float, or quantization-aware when the metadata says so."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from qrobust.models.checkpoint import Checkpoint, load_checkpoint
from qrobust.quant import QuantConfig, prepare_qat


def load_model(path: str | Path) -> tuple[nn.Module, Checkpoint]:
    """The model saved at ``path`` with its weights (eval mode), and the checkpoint it came from.

    A checkpoint whose metadata has a ``qat`` entry (the QuantConfig as a dict) holds a model made by
    ``prepare_qat``; it is rebuilt the same way, so training can resume and ``convert`` can follow.
    """
    checkpoint = load_checkpoint(path)
    qat = checkpoint.metadata.get("qat")
    wrap = None if qat is None else (lambda model: prepare_qat(model, QuantConfig(**qat)))
    return checkpoint.build(wrap), checkpoint
