"""`qrobust weight-bound` and `qrobust verify-quantization` on a tiny digits MLP, and their error paths."""

import json

import pytest
import torch

from qrobust.data import load_dataset
from qrobust.models import build_model
from qrobust.models.checkpoint import Checkpoint, model_metadata, save_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A depth-3 MLP fitted for a few full-batch Adam steps on digits, saved as a float checkpoint."""
    data = load_dataset("digits", "train")
    torch.manual_seed(0)
    model = build_model("mlp", data.info, depth=3, width=16)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(100):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(data.images.float() / 255), data.labels).backward()
        optimizer.step()
    path = tmp_path_factory.mktemp("model") / "mlp.pt"
    save_checkpoint(path, Checkpoint(model.state_dict(), model_metadata("mlp", {"depth": 3, "width": 16}, data.info)))
    return path


def test_weight_bound_table_and_json(run, checkpoint, tmp_path):
    output = tmp_path / "bounds.json"
    code, out, err = run(
        "weight-bound", checkpoint, "--layers", 1, "--layers", 2, "--num-examples", 8, "--output", output
    )
    assert code == 0, err
    assert "median eps" in out and "Linear 16->10" in out
    record = json.loads(output.read_text())
    assert [row["layer"] for row in record["layers"]] == [1, 2] and record["norm"] == "inf"
    assert all(len(row["eps"]) == 8 and row["median"] >= 0 for row in record["layers"])
    assert record["layers"][1]["mean"] > 0


def test_verify_quantization(run, checkpoint, tmp_path):
    int8 = tmp_path / "mlp.int8.pt"
    code, _, err = run("quantize", checkpoint, "--output", int8, "--calibration-images", 128)
    assert code == 0, err
    output = tmp_path / "verify.json"
    code, out, err = run("verify-quantization", checkpoint, int8, "--num-examples", 40, "--output", output)
    assert code == 0, err
    assert "certified:" in out and "measured agreement" in out
    record = json.loads(output.read_text())
    assert len(record["certified"]) == 40 and 0 < record["certified_fraction"] <= record["agreement"]


@pytest.mark.parametrize(
    "args, message",
    [
        (("weight-bound", "missing.pt"), "not found"),
        (("weight-bound", "{checkpoint}", "--norm", "0.5"), "norm"),
        (("weight-bound", "{checkpoint}", "--layers", "9"), "layer"),
        (("verify-quantization", "{checkpoint}", "missing.int8.pt"), "not found"),
    ],
)
def test_errors_are_one_line(run, checkpoint, args, message):
    code, out, err = run(*(str(arg).format(checkpoint=checkpoint) for arg in args))
    assert code == 2 and message in err and "Traceback" not in err + out
    assert len(err.strip().splitlines()) == 1
