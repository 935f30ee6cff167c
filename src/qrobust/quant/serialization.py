"""int8 model files: the integer program, its tensors packed by dtype, and JSON metadata.

A file is a ``torch.save`` archive of tensors and strings only, read with ``weights_only=True``:
``{"format": "qrobust-int8", "format_version": 1, "program": <JSON of Int8Model.spec()>,
"layout": <JSON {tensor name: [dtype, offset, shape]}>, "metadata": <JSON>, "tensors": {dtype: 1-d tensor}}``.
The program's ``input_margin`` (``QuantConfig.input_margin``) is absent from files written before the
option existed; they load with margin 0, which is what they were made with. Packing all int8 weights
into one tensor (and likewise int32, uint8, float64) keeps the per-tensor archive overhead out of the
file, which is a little over a quarter of the float checkpoint's size.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qrobust.errors import CheckpointError
from qrobust.models.checkpoint import (
    build_skeleton,
    check_skeleton,
    read_archive,
    write_archive,
)
from qrobust.quant.engine import Int8Model

FORMAT = "qrobust-int8"
FORMAT_VERSION = 1
_DTYPES = {
    str(dtype): dtype for dtype in (torch.uint8, torch.int8, torch.int32, torch.int64, torch.float32, torch.float64)
}


@dataclass
class Int8Checkpoint:
    """What an int8 file holds: the model and the caller's metadata (e.g. ``model_metadata(...)``)."""

    model: Int8Model
    metadata: dict[str, Any] = field(default_factory=dict)


def _pack(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, list]]:
    """Concatenate the tensors of each dtype into one flat tensor; the layout says where each one is."""
    groups: dict[str, list[torch.Tensor]] = {}
    layout: dict[str, list] = {}
    for name, tensor in state.items():
        parts = groups.setdefault(str(tensor.dtype), [])
        layout[name] = [str(tensor.dtype), sum(part.numel() for part in parts), list(tensor.shape)]
        parts.append(tensor.detach().flatten())
    return {dtype: torch.cat(parts) for dtype, parts in groups.items()}, layout


def _unpack(packed: dict[str, torch.Tensor], layout: dict[str, list]) -> dict[str, torch.Tensor]:
    state = {}
    for name, (dtype, offset, shape) in layout.items():
        flat = packed.get(dtype)
        if dtype not in _DTYPES or not isinstance(flat, torch.Tensor) or flat.dtype != _DTYPES[dtype]:
            stored = flat.dtype if isinstance(flat, torch.Tensor) else "nothing"
            raise ValueError(f"tensor {name!r} has dtype {dtype!r} stored as {stored}")
        count = math.prod(shape)
        if offset < 0 or offset + count > flat.numel():
            raise ValueError(f"tensor {name!r} lies outside its packed {dtype} data")
        state[name] = flat[offset : offset + count].view(shape).clone()
    return state


def save_int8(path: str | Path, model: Int8Model, metadata: dict[str, Any] | None = None) -> int:
    """Write ``model`` and JSON-serialisable ``metadata`` to ``path`` atomically; return the file's size in bytes."""
    if not isinstance(model, Int8Model):
        raise ValueError(f"save_int8 takes an Int8Model, got {type(model).__name__}")
    try:
        metadata_json = json.dumps(metadata or {})
    except TypeError as error:
        raise ValueError(f"metadata must be JSON-serialisable: {error}") from None
    packed, layout = _pack(model.state_dict())
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "program": json.dumps(model.spec()),
        "layout": json.dumps(layout),
        "metadata": metadata_json,
        "tensors": packed,
    }
    return write_archive(Path(path), payload)


def load_int8(path: str | Path, memory_limit: float | None = None) -> Int8Checkpoint:
    """Read an int8 file; anything missing, truncated, foreign or carrying pickled code raises CheckpointError.

    A file or model above ``memory_limit`` GiB (None: the default of ``qrobust.limits``) is refused: the
    program is built on the meta device first and its tensors checked against the layout's shapes.
    """
    payload = read_archive(path, FORMAT, FORMAT_VERSION, "int8 model", memory_limit)
    try:
        spec, layout = json.loads(payload["program"]), json.loads(payload["layout"])
        skeleton = build_skeleton(lambda: Int8Model.from_spec(spec), len(layout), "the int8 model")
        check_skeleton(
            skeleton, {name: shape for name, (_, _, shape) in layout.items()}, "the int8 model", memory_limit
        )
        model = Int8Model.from_spec(spec)
        model.load_state_dict(_unpack(payload["tensors"], layout))
        return Int8Checkpoint(model, json.loads(payload["metadata"]))
    except (AttributeError, KeyError, TypeError, ValueError, RuntimeError) as error:
        reason = str(error).strip().splitlines()[0]
        raise CheckpointError(f"{path} holds a corrupt int8 model: {reason}") from None
