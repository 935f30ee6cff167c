"""Tests for qrobust.quant.serialization: int8 files round-trip, stay small and refuse foreign data."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from qrobust.errors import CheckpointError, QRobustError
from qrobust.models.checkpoint import Checkpoint, model_metadata, save_checkpoint
from qrobust.quant import load_int8, save_int8
from qrobust.quant.engine import Int8Model
from qrobust.quant.serialization import FORMAT

from .conftest import SHAPES, intrs_noisy, make_info


@pytest.mark.parametrize("name", ["mlp", "cnn", "resnet20"])
def test_round_trip_and_size(name: str, quantized, tmp_path: Path) -> None:
    q = quantized(name)
    metadata = model_metadata(name, {}, make_info(SHAPES[name]), sigma=0.25)
    size = save_int8(tmp_path / "model.int8.pt", q.int8, metadata)
    loaded = load_int8(tmp_path / "model.int8.pt")
    assert loaded.metadata == json.loads(json.dumps(metadata))
    assert loaded.model.spec() == q.int8.spec()
    assert torch.equal(loaded.model(q.images), q.int8(q.images))
    save_checkpoint(tmp_path / "model.pt", Checkpoint(q.model.state_dict(), metadata))
    assert size == (tmp_path / "model.int8.pt").stat().st_size
    assert size <= 0.3 * (tmp_path / "model.pt").stat().st_size


def test_round_trip_keeps_the_input_margin(quantized, tmp_path: Path) -> None:
    q = quantized("cnn", margin=255)
    save_int8(tmp_path / "model.int8.pt", q.int8)
    loaded = load_int8(tmp_path / "model.int8.pt").model
    assert (loaded.input_margin, loaded.input_step, loaded.input_zero_point) == (255, 3, 85)
    noisy = intrs_noisy(q.images, 0.5, seed=8)
    assert torch.equal(loaded(noisy), q.int8(noisy))


def test_files_without_an_input_margin_load_with_margin_zero(quantized, tmp_path: Path) -> None:
    """Files written before the option existed have no ``input_margin`` in their program."""
    q = quantized("cnn")
    path = tmp_path / "old.int8.pt"
    save_int8(path, q.int8)
    payload = torch.load(path, weights_only=True)
    program = json.loads(payload["program"])
    del program["input_margin"]
    payload["program"] = json.dumps(program)
    torch.save(payload, path)
    loaded = load_int8(path).model
    assert loaded.input_margin == 0 and loaded.spec() == q.int8.spec()
    assert torch.equal(loaded(q.images), q.int8(q.images))


class Payload:
    """Not a tensor: unpickling it would run code, which weights_only refuses."""


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "not found"),
        ({"format": "something-else"}, "not a qrobust int8 model"),
        ({"format": FORMAT, "format_version": 99}, "format version 99"),
        (
            {"format": FORMAT, "format_version": 1, "program": "{}", "layout": "{}", "metadata": "{}", "tensors": {}},
            "corrupt int8 model",
        ),
        (Payload(), "pickled Python objects"),
    ],
)
def test_foreign_files_raise_checkpoint_error(content, message, tmp_path: Path) -> None:
    path = tmp_path / "model.int8.pt"
    if content is not None:
        torch.save(content, path)
    with pytest.raises(CheckpointError, match=message):
        load_int8(path)


def test_truncated_and_tampered_files_raise_checkpoint_error(quantized, tmp_path: Path) -> None:
    path = tmp_path / "model.int8.pt"
    save_int8(path, quantized("mlp").int8)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_int8(path)
    save_int8(path, quantized("mlp").int8)
    payload = torch.load(path, weights_only=True)
    layout = json.loads(payload["layout"])
    layout["ops.1.weight"][1] = 10**9  # points past the packed int8 data
    payload["layout"] = json.dumps(layout)
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="outside its packed"):
        load_int8(path)


@pytest.mark.parametrize("seed", range(20))
def test_random_bytes_raise_checkpoint_error(seed: int, tmp_path: Path) -> None:
    path = tmp_path / "noise.pt"
    path.write_bytes(random.Random(seed).randbytes(2048))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_int8(path)


def test_save_checks_its_arguments(quantized, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="JSON-serialisable"):
        save_int8(tmp_path / "m.pt", quantized("mlp").int8, {"bad": object()})
    with pytest.raises(ValueError, match="takes an Int8Model"):
        save_int8(tmp_path / "m.pt", quantized("mlp").qat)


def _tamper(path: Path, change) -> None:
    """Apply ``change`` to the program spec of the int8 file ``path``, as a crafted file would."""
    payload = torch.load(path, weights_only=True)
    program = json.loads(payload["program"])
    change(program)
    payload["program"] = json.dumps(program)
    torch.save(payload, path)


@pytest.fixture
def built_only_on_meta(monkeypatch):
    """Fail a test whose int8 model is built for real (its memory allocated) before the checks refuse it."""
    real = Int8Model.from_spec.__func__

    def from_spec(cls, spec):
        assert torch.get_default_device().type == "meta", "the int8 model was built for real before its checks"
        return real(cls, spec)

    monkeypatch.setattr(Int8Model, "from_spec", classmethod(from_spec))


def test_a_crafted_program_is_refused_before_the_model_is_built(quantized, tmp_path: Path, built_only_on_meta) -> None:
    path = tmp_path / "model.int8.pt"
    save_int8(path, quantized("mlp").int8)
    _tamper(path, lambda program: program["ops"][2].update(weight_shape=[45_000, 45_000]))  # 2 GB of int8
    with pytest.raises(
        CheckpointError,
        match=r"do not fit the int8 model: ops.2.weight has shape \[256, 256\] in the file but \[45000, 45000\] in the model$",
    ):
        load_int8(path)
    _tamper(path, lambda program: program["ops"].extend(program["ops"][1:2] * 1000))
    with pytest.raises(CheckpointError, match="its metadata describes more than"):
        load_int8(path)


def test_an_int8_file_above_the_memory_limit_is_not_read(quantized, tmp_path: Path) -> None:
    path = tmp_path / "model.int8.pt"
    save_int8(path, quantized("mlp").int8)
    with pytest.raises(QRobustError, match=r"^reading .* needs ~0.000\d+ GiB, above the memory limit of 0.0001 GiB"):
        load_int8(path, memory_limit=0.0001)
