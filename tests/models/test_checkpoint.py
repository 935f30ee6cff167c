import os

import pytest
import torch

from qrobust.data import DatasetInfo
from qrobust.errors import CheckpointError
from qrobust.models import build_model
from qrobust.models.checkpoint import Checkpoint, load_checkpoint, model_metadata, save_checkpoint

INFO = DatasetInfo("tiny", (1, 8, 8), tuple("abc"), (0.3,), (0.2,))


def _saved(tmp_path):
    torch.manual_seed(0)
    model = build_model("mlp", INFO, depth=2, width=16)
    path = tmp_path / "model.pt"
    save_checkpoint(path, Checkpoint(model.state_dict(), model_metadata("mlp", {"depth": 2, "width": 16}, INFO, sigma=0.25)))
    return model, path


def test_round_trip_rebuilds_the_same_model(tmp_path):
    model, path = _saved(tmp_path)
    loaded = load_checkpoint(path)
    assert loaded.metadata["sigma"] == 0.25 and loaded.metadata["versions"]["torch"] == torch.__version__
    assert loaded.dataset_info == INFO
    x = torch.rand(4, 1, 8, 8)
    assert torch.equal(loaded.build()(x), model.eval()(x))
    assert not (tmp_path / "model.pt.tmp").exists()


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
