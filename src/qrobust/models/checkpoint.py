"""Model checkpoints: a state_dict plus JSON metadata, written atomically and read without unpickling code.

A checkpoint is a ``torch.save`` file holding only tensors, strings and numbers:
``{"format": "qrobust-checkpoint", "format_version": 1, "metadata": <JSON string>,
"state_dict": {...}, "training_state": {...} or absent}``. It is loaded with ``weights_only=True``, so a
file carrying pickled code is refused instead of executed. Nothing in a file is trusted: an archive that
would unpack to more than the memory limit (``qrobust.limits``) is not read, and the model its metadata
describes is built on the meta device and checked against the file's tensor shapes and the limit
before it is built for real (``Checkpoint.build``).
"""

from __future__ import annotations

import json
import pickle
import platform
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.modules.module import (
    register_module_buffer_registration_hook,
    register_module_module_registration_hook,
    register_module_parameter_registration_hook,
)
from torch.overrides import TorchFunctionMode

import qrobust
from qrobust.data.base import DatasetInfo
from qrobust.errors import CheckpointError
from qrobust.limits import check_memory
from qrobust.models.registry import build_model, factory_path, find_factory, get_factory, is_builtin
from qrobust.outputs import atomic_path

FORMAT = "qrobust-checkpoint"
FORMAT_VERSION = 1


@dataclass
class Checkpoint:
    """What a checkpoint file holds. ``metadata`` always has ``model``, ``model_options`` and ``dataset``."""

    state_dict: dict[str, torch.Tensor]
    metadata: dict[str, Any]
    training_state: dict[str, Any] = field(default_factory=dict)

    def build(
        self, wrap: Callable[[nn.Module], nn.Module] | None = None, memory_limit: float | None = None
    ) -> nn.Module:
        """The model described by the metadata, with the saved weights, in eval mode.

        ``wrap`` transforms the freshly built model before the weights are loaded, for checkpoints of
        wrapped models (e.g. ``qrobust.quant.prepare_qat`` for quantization-aware training). Without it, a
        mixed-precision model (metadata ``"bit_policy"``: ``BitPolicy.to_dict()``) is rebuilt by
        ``prepare_qat(model, policy)``; its state dict holds the calibrated clips.

        The metadata is untrusted: the model is first built on the meta device (no memory), and its
        tensors must have the names and shapes of the saved ones and fit ``memory_limit`` GiB
        (``qrobust.limits``) before it is built for real.
        """
        self._check_factory()
        if wrap is None and "bit_policy" in self.metadata:
            wrap = self._mixed_precision()
        what = f"model {self.metadata['model']!r}"
        skeleton = build_skeleton(lambda: self._assemble(wrap), len(self.state_dict), what)
        check_skeleton(skeleton, {name: tensor.shape for name, tensor in self.state_dict.items()}, what, memory_limit)
        model = self._assemble(wrap)
        try:
            model.load_state_dict(self.state_dict)
        except RuntimeError as error:
            first_line = str(error).strip().splitlines()[0]
            raise CheckpointError(f"checkpoint weights do not fit {what}: {first_line}") from None
        return model.eval()

    def _check_factory(self) -> None:
        """Raise CheckpointError, saying how to make it known, if the metadata's model is not buildable here.

        Only registered names and installed entry points are looked up: nothing the file names is imported.
        """
        name = self.metadata["model"]
        if not isinstance(name, str):
            raise CheckpointError(f"checkpoint is corrupt: its model name is {name!r}, not a string")
        if find_factory(name) is None:
            if ":" in name:
                advice = f"pass --model {name} (or import {name.partition(':')[0]} first, in Python)"
            else:
                made_by = f" (made by {self.metadata['factory']})" if "factory" in self.metadata else ""
                advice = f"install or import the package that registers it{made_by}, or register it with qrobust.models.register_model"
            raise CheckpointError(
                f"checkpoint model {name!r} is not registered: {advice}; qrobust never imports code that a file names"
            ) from None

    def _assemble(self, wrap: Callable[[nn.Module], nn.Module] | None) -> nn.Module:
        """A freshly initialised model of the metadata, wrapped by ``wrap``, on the default device."""
        model = build_model(self.metadata["model"], self.dataset_info, **self.metadata["model_options"])
        return model if wrap is None else wrap(model)

    def _mixed_precision(self) -> Callable[[nn.Module], nn.Module]:
        """The ``wrap`` that rebuilds the mixed-precision model of the metadata's bit policy."""
        from qrobust.quant import (  # qrobust.quant imports qrobust.models: import late
            BitPolicy,
            prepare_qat,
        )

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


def build_skeleton(build: Callable[[], nn.Module], file_tensors: int, what: str) -> nn.Module:
    """``build()`` on the meta device, where no tensor has memory, for ``check_skeleton``.

    Building stops with CheckpointError once it has registered more than 4 modules or tensors per tensor
    of the file (plus 64; qrobust's models register at most 2): metadata asking for a far deeper model
    than its file holds then costs neither memory nor time. (The count uses torch's global registration
    hooks, so modules built meanwhile by other threads count too.)
    """
    budget, count = 4 * file_tensors + 64, 0

    def register(*args: object) -> None:
        nonlocal count
        count += 1
        if count > budget:
            raise CheckpointError(
                f"checkpoint weights do not fit {what}: its metadata describes more than {budget:,} "
                f"modules and tensors, its file holds {file_tensors:,} tensors"
            )

    hooks = [
        add(register)
        for add in (
            register_module_module_registration_hook,
            register_module_parameter_registration_hook,
            register_module_buffer_registration_hook,
        )
    ]
    try:
        with torch.device("meta"), _SkipRandomInit():
            return build()
    finally:
        for hook in hooks:
            hook.remove()


class _SkipRandomInit(TorchFunctionMode):
    """Leaves meta tensors' ``normal_`` (He initialisation) undone: they have no values, and torch's meta
    ``normal_`` imports its compiler, 1.5 s, on first use."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.normal_ and args[0].is_meta:
            return args[0]
        return func(*args, **(kwargs or {}))


def check_skeleton(
    skeleton: nn.Module, shapes: Mapping[str, Sequence[int]], what: str, memory_limit: float | None
) -> None:
    """Raise unless ``skeleton`` (a model built by ``build_skeleton``) has a tensor of each name and shape in
    ``shapes`` (a file's) and no other, and its tensors fit ``memory_limit`` GiB (None: the default).

    Run before building a model from a file's metadata for real, so that no metadata allocates more
    than the file's own tensors or the limit allows.
    """
    expected = skeleton.state_dict()
    missing, unexpected = sorted(expected.keys() - shapes.keys()), sorted(shapes.keys() - expected.keys())
    if missing or unexpected:
        names = ", ".join(
            [*(f"{name} is missing" for name in missing), *(f"{name} is unexpected" for name in unexpected)][:3]
        )
        raise CheckpointError(f"checkpoint weights do not fit {what}: {names}")
    for name, tensor in expected.items():
        if list(shapes[name]) != list(tensor.shape):
            raise CheckpointError(
                f"checkpoint weights do not fit {what}: {name} has shape {list(shapes[name])} "
                f"in the file but {list(tensor.shape)} in the model"
            )
    check_memory(what, sum(tensor.numel() * tensor.element_size() for tensor in expected.values()), memory_limit)


def model_metadata(model_name: str, model_options: dict[str, Any], info: DatasetInfo, **extra: Any) -> dict[str, Any]:
    """Metadata describing how to rebuild a model, with library versions; ``extra`` adds run facts.

    A model not built into qrobust also records its factory as ``module:qualified_name``, for messages.
    """
    factory = {} if is_builtin(model_name) else {"factory": factory_path(get_factory(model_name))}
    return {
        "model": model_name,
        "model_options": dict(model_options),
        **factory,
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
    """``torch.save`` ``payload`` to ``path`` atomically (``qrobust.outputs.atomic_path``); returns its size."""
    with atomic_path(path) as temporary:
        torch.save(payload, temporary)
    return path.stat().st_size


def load_checkpoint(path: str | Path, memory_limit: float | None = None) -> Checkpoint:
    """Read a checkpoint; anything missing, truncated, foreign or carrying pickled code raises CheckpointError,
    and a file larger than ``memory_limit`` GiB (None: the default of ``qrobust.limits``) is not read."""
    payload = read_archive(path, FORMAT, FORMAT_VERSION, "checkpoint", memory_limit)
    try:
        metadata = json.loads(payload["metadata"])
        missing = {"model", "model_options", "dataset"} - set(metadata)
        if missing:
            raise ValueError(f"metadata lacks {sorted(missing)}")
        if not all(isinstance(tensor, torch.Tensor) for tensor in payload["state_dict"].values()):
            raise ValueError("its state_dict holds something other than tensors")
        return Checkpoint(payload["state_dict"], metadata, payload.get("training_state", {}))
    except (AttributeError, KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{path} is a corrupt checkpoint: {error}") from None


def read_archive(
    path: str | Path, format_name: str, format_version: int, kind: str, memory_limit: float | None = None
) -> dict[str, Any]:
    """The payload dict of a qrobust ``torch.save`` file, read with ``weights_only=True``.

    Shared by every qrobust file type (``kind`` names it in messages). A missing file, a truncated or
    corrupt archive, pickled code, a foreign file (no ``format_name`` marker) or another format
    version raises CheckpointError with one line that says which; an archive that would unpack to more
    than ``memory_limit`` GiB raises QRobustError before anything is read.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{kind} not found: {path}")
    check_memory(f"reading {path}", _unpacked_size(path), memory_limit)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "GLOBAL" in str(error):  # the weights-only unpickler met a reference to code
            raise CheckpointError(
                f"refusing to load {path}: it contains pickled Python objects, which qrobust files never do"
            ) from None
        raise CheckpointError(f"{path} is truncated or corrupt: not a tensor archive") from None
    except Exception as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{path} is truncated or corrupt: {reason}") from None
    if not isinstance(payload, dict) or payload.get("format") != format_name:
        raise CheckpointError(f"{path} is not a qrobust {kind} (no '{format_name}' format marker)")
    if payload.get("format_version") != format_version:
        raise CheckpointError(
            f"{path} has {kind} format version {payload.get('format_version')!r}; this qrobust reads {format_version}"
        )
    return payload


def _unpacked_size(path: Path) -> int:
    """The bytes ``torch.load`` reads from the zip archive ``path``: its entries' uncompressed sizes, from
    the zip's directory (torch also reads compressed entries, which may expand a thousandfold).

    Anything but a zip archive is refused unread: qrobust writes only those, and torch's legacy format
    allocates storages of the sizes the file claims.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            return sum(entry.file_size for entry in archive.infolist())
    except (zipfile.BadZipFile, ValueError, EOFError):
        raise CheckpointError(f"{path} is truncated or corrupt: not a zip tensor archive") from None
