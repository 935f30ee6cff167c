"""Model checkpoints: a state_dict plus JSON metadata, written atomically and read without unpickling code.

A checkpoint is a ``torch.save`` file holding only tensors, strings and numbers:
``{"format": "qrobust-checkpoint", "format_version": 1, "metadata": <JSON string>,
"state_dict": {...}, "training_state": {...} or absent}``. It is loaded with ``weights_only=True``, so a
file carrying pickled code is refused instead of executed.
"""

from __future__ import annotations

import json
import os
import pickle
import platform
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import qrobust
from qrobust.data.base import DatasetInfo
from qrobust.errors import CheckpointError
from qrobust.models.registry import build_model

FORMAT = "qrobust-checkpoint"
FORMAT_VERSION = 1


@dataclass
class Checkpoint:
    """What a checkpoint file holds. ``metadata`` always has ``model``, ``model_options`` and ``dataset``."""

    state_dict: dict[str, torch.Tensor]
    metadata: dict[str, Any]
    training_state: dict[str, Any] = field(default_factory=dict)

    def build(self, wrap: Callable[[nn.Module], nn.Module] | None = None) -> nn.Module:
        """The model described by the metadata, with the saved weights, in eval mode.

        ``wrap`` transforms the freshly built model before the weights are loaded, for checkpoints of
        wrapped models (e.g. ``qrobust.quant.prepare_qat`` for quantization-aware training). Without it, a
        mixed-precision model (metadata ``"bit_policy"``: ``BitPolicy.to_dict()``) is rebuilt by
        ``prepare_qat(model, policy)``; its state dict holds the calibrated clips.
        """
        model = build_model(self.metadata["model"], self.dataset_info, **self.metadata["model_options"])
        if wrap is None and "bit_policy" in self.metadata:
            wrap = self._mixed_precision()
        if wrap is not None:
            model = wrap(model)
        try:
            model.load_state_dict(self.state_dict)
        except RuntimeError as error:
            first_line = str(error).strip().splitlines()[0]
            raise CheckpointError(f"checkpoint weights do not fit model {self.metadata['model']!r}: {first_line}") from None
        return model.eval()

    def _mixed_precision(self) -> Callable[[nn.Module], nn.Module]:
        """The ``wrap`` that rebuilds the mixed-precision model of the metadata's bit policy."""
        from qrobust.quant import BitPolicy, prepare_qat  # qrobust.quant imports qrobust.models: import late

        try:
            policy = BitPolicy.from_dict(self.metadata["bit_policy"])
        except ValueError as error:
            raise CheckpointError(f"checkpoint has a corrupt bit_policy: {error}") from None

        def wrap(model: nn.Module) -> nn.Module:
            try:
                return prepare_qat(model, policy)
            except ValueError as error:
                message = f"checkpoint bit_policy does not fit model {self.metadata['model']!r}: {error}"
                raise CheckpointError(message) from None

        return wrap

    @property
    def dataset_info(self) -> DatasetInfo:
        return DatasetInfo.from_dict(self.metadata["dataset"])


def model_metadata(model_name: str, model_options: dict[str, Any], info: DatasetInfo, **extra: Any) -> dict[str, Any]:
    """Metadata describing how to rebuild a model, with library versions; ``extra`` adds run facts."""
    return {
        "model": model_name,
        "model_options": dict(model_options),
        "dataset": asdict(info),
        "versions": {"qrobust": qrobust.__version__, "torch": torch.__version__, "python": platform.python_version()},
        **extra,
    }


def save_checkpoint(path: str | Path, checkpoint: Checkpoint) -> None:
    """Write ``checkpoint`` to ``path`` atomically: a crash leaves the previous file intact."""
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "metadata": json.dumps(checkpoint.metadata),
        "state_dict": checkpoint.state_dict,
    }
    if checkpoint.training_state:
        payload["training_state"] = checkpoint.training_state
    write_archive(Path(path), payload)


def write_archive(path: Path, payload: dict[str, Any]) -> int:
    """``torch.save`` ``payload`` to ``path`` atomically (a temporary file, then a rename); returns its size."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    torch.save(payload, temporary)
    os.replace(temporary, path)
    return path.stat().st_size


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint; anything missing, truncated, foreign or carrying pickled code raises CheckpointError."""
    payload = read_archive(path, FORMAT, FORMAT_VERSION, "checkpoint")
    try:
        metadata = json.loads(payload["metadata"])
        missing = {"model", "model_options", "dataset"} - set(metadata)
        if missing:
            raise ValueError(f"metadata lacks {sorted(missing)}")
        return Checkpoint(payload["state_dict"], metadata, payload.get("training_state", {}))
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{path} has corrupt metadata: {error}") from None


def read_archive(path: str | Path, format_name: str, format_version: int, kind: str) -> dict[str, Any]:
    """The payload dict of a qrobust ``torch.save`` file, read with ``weights_only=True``.

    Shared by every qrobust file type (``kind`` names it in messages). A missing file, a truncated or
    corrupt archive, pickled code, a foreign file (no ``format_name`` marker) or another format
    version raises CheckpointError with one line that says which.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{kind} not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "GLOBAL" in str(error):  # the weights-only unpickler met a reference to code
            raise CheckpointError(
                f"refusing to load {path}: it contains pickled Python objects, which qrobust files never do"
            ) from None
        raise CheckpointError(f"{path} is truncated or corrupt: not a tensor archive") from None
    except Exception as error:  # torch's archive reader raises many types on damaged files
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{path} is truncated or corrupt: {reason}") from None
    if not isinstance(payload, dict) or payload.get("format") != format_name:
        raise CheckpointError(f"{path} is not a qrobust {kind} (no '{format_name}' format marker)")
    if payload.get("format_version") != format_version:
        raise CheckpointError(
            f"{path} has {kind} format version {payload.get('format_version')!r}; this qrobust reads {format_version}"
        )
    return payload
