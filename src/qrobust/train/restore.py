"""Rebuild the model of a training checkpoint: float, or quantization-aware when the metadata says so."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from qrobust.models.checkpoint import Checkpoint, load_checkpoint
from qrobust.quant import QuantConfig, prepare_qat


def load_model(path: str | Path, memory_limit: float | None = None) -> tuple[nn.Module, Checkpoint]:
    """The model saved at ``path`` with its weights (eval mode), and the checkpoint it came from.

    A checkpoint whose metadata has a ``qat`` entry (the QuantConfig as a dict) holds a model made by
    ``prepare_qat``; it is rebuilt the same way, so training can resume and ``convert`` can follow.
    A file or model above ``memory_limit`` GiB (None: the default of ``qrobust.limits``) is refused unbuilt.
    """
    checkpoint = load_checkpoint(path, memory_limit)
    qat = checkpoint.metadata.get("qat")
    wrap = None if qat is None else (lambda model: prepare_qat(model, QuantConfig(**qat)))
    return checkpoint.build(wrap, memory_limit), checkpoint
