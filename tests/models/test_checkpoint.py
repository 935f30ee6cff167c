import json
import os
import zipfile

import pytest
import torch

from qrobust.data import DatasetInfo
from qrobust.errors import CheckpointError, QRobustError
from qrobust.models import build_model
from qrobust.models import checkpoint as checkpoint_module
from qrobust.models.checkpoint import (
    Checkpoint,
    load_checkpoint,
    model_metadata,
    save_checkpoint,
)

INFO = DatasetInfo("tiny", (1, 8, 8), tuple("abc"), (0.3,), (0.2,))


def _saved(tmp_path):
    torch.manual_seed(0)
    model = build_model("mlp", INFO, depth=2, width=16)
    path = tmp_path / "model.pt"
    save_checkpoint(
        path, Checkpoint(model.state_dict(), model_metadata("mlp", {"depth": 2, "width": 16}, INFO, sigma=0.25))
    )
    return model, path


def test_round_trip_rebuilds_the_same_model(tmp_path):
    model, path = _saved(tmp_path)
    loaded = load_checkpoint(path)
    assert loaded.metadata["sigma"] == 0.25 and loaded.metadata["versions"]["torch"] == torch.__version__
    assert loaded.dataset_info == INFO
    x = torch.rand(4, 1, 8, 8)
    assert torch.equal(loaded.build()(x), model.eval()(x))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]  # no temporary file left


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    _, path = _saved(tmp_path)
    before = path.read_bytes()

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", fail)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, Checkpoint({}, {"model": "mlp", "model_options": {}, "dataset": {}}))
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def test_truncated_checkpoint(tmp_path):
    _, path = _saved(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(path)


def test_random_bytes(tmp_path):
    path = tmp_path / "noise.pt"
    path.write_bytes(os.urandom(2048))
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(path)


class _Payload:
    """Pickles to a call that would create a file if it were ever unpickled."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_pickled_code_is_refused_and_never_run(tmp_path):
    target = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"format": "qrobust-checkpoint", "payload": _Payload(target)}, path)
    with pytest.raises(CheckpointError, match="pickled Python objects"):
        load_checkpoint(path)
    assert not target.exists()


def test_foreign_and_missing_files(tmp_path):
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a qrobust checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "absent.pt")
    torch.save({"format": "qrobust-checkpoint", "format_version": 99}, tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match="format version 99"):
        load_checkpoint(tmp_path / "future.pt")


def test_weights_that_do_not_fit_the_architecture(tmp_path):
    model = build_model("mlp", INFO, depth=2, width=16)
    path = tmp_path / "mismatch.pt"
    save_checkpoint(path, Checkpoint(model.state_dict(), model_metadata("mlp", {"depth": 3, "width": 16}, INFO)))
    with pytest.raises(CheckpointError, match="do not fit"):
        load_checkpoint(path).build()


def _rewrite(path, metadata_change=None, state_change=None, compression=zipfile.ZIP_STORED):
    """Rewrite the checkpoint at ``path`` as a crafted file would: other metadata, tensors or zip compression."""
    payload = torch.load(path, weights_only=True)
    payload["metadata"] = json.dumps(json.loads(payload["metadata"]) | (metadata_change or {}))
    payload["state_dict"] |= state_change or {}
    torch.save(payload, path)
    if compression != zipfile.ZIP_STORED:
        with zipfile.ZipFile(path) as stored:
            entries = [(entry.filename, stored.read(entry)) for entry in stored.infolist()]
        with zipfile.ZipFile(path, "w", compression) as compressed:
            for name, data in entries:
                compressed.writestr(name, data)


@pytest.fixture
def built_only_on_meta(monkeypatch):
    """Fail a test whose model is built for real (its memory allocated) before the checks refuse it."""
    real = checkpoint_module.build_model

    def build_model(*args, **kwargs):
        assert torch.get_default_device().type == "meta", "the model was built for real before its checks"
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoint_module, "build_model", build_model)


@pytest.mark.parametrize(
    "options, message",
    [
        (
            {"depth": 3, "width": 45_000},
            "do not fit model 'mlp': hidden.2.bias is missing, hidden.2.weight is missing$",
        ),
        (
            {"depth": 2, "width": 45_000},
            r"do not fit model 'mlp': hidden.0.weight has shape \[16, 64\] in the file but \[45000, 64\] in the model$",
        ),
        (
            {"depth": 10**7, "width": 16},
            "do not fit model 'mlp': its metadata describes more than 88 modules and tensors, its file holds 6 tensors$",
        ),
    ],
)
def test_crafted_metadata_is_refused_before_the_model_is_built(tmp_path, built_only_on_meta, options, message):
    """The issue's checkpoint: metadata asking for an 8 GB mlp (or a 10^7-layer one) over a few KB of weights."""
    _, path = _saved(tmp_path)
    _rewrite(path, {"model_options": options})
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path).build()


def test_a_model_above_the_memory_limit_is_refused_before_it_is_built(tmp_path, built_only_on_meta):
    _, path = _saved(tmp_path)
    checkpoint = load_checkpoint(path)
    with pytest.raises(
        QRobustError,
        match=r"^model 'mlp' needs ~4.\d+e-06 GiB, above the memory limit of 1e-06 GiB; pass --memory-limit",
    ):
        checkpoint.build(memory_limit=1e-6)


def test_a_file_that_would_unpack_above_the_memory_limit_is_not_read(tmp_path, monkeypatch):
    """Sizes come from the zip's directory: a compressed entry counts at its unpacked size."""
    _, path = _saved(tmp_path)
    _rewrite(path, state_change={"padding": torch.zeros(2**20)}, compression=zipfile.ZIP_DEFLATED)
    assert path.stat().st_size < 0.01 * 4 * 2**20
    monkeypatch.setattr(torch, "load", None)  # reading it would fail with a TypeError
    with pytest.raises(
        QRobustError, match=r"^reading .*model.pt needs ~0.00\d+ GiB, above the memory limit of 0.001 GiB"
    ):
        load_checkpoint(path, memory_limit=0.001)


def test_a_file_in_torchs_legacy_format_is_refused_unread(tmp_path):
    """qrobust writes zip archives only; the legacy format would allocate storages of any size it claims."""
    target = tmp_path / "pwned"
    path = tmp_path / "legacy.pt"
    torch.save(
        {"format": "qrobust-checkpoint", "payload": _Payload(target)}, path, _use_new_zipfile_serialization=False
    )
    with pytest.raises(CheckpointError, match="truncated or corrupt: not a zip tensor archive"):
        load_checkpoint(path)
    assert not target.exists()
