"""`qrobust quantize --method admm|lb`: low-bit checkpoints the rest of the CLI reads, codes, errors."""

import json

import pytest
import torch

from qrobust.data import load_dataset
from qrobust.models import build_model
from qrobust.models.checkpoint import Checkpoint, model_metadata, save_checkpoint
from qrobust.quant import load_codes
from qrobust.train import TrainConfig, load_model, train


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A small float MLP on digits, trained in-process (~1 s)."""
    data = load_dataset("digits", "train")
    torch.manual_seed(0)
    model = build_model("mlp", data.info, depth=3, width=32)
    train(model, data, TrainConfig(epochs=5, batch_size=32, lr=0.05, seed=0), progress=False)
    path = tmp_path_factory.mktemp("model") / "mlp.pt"
    metadata = model_metadata("mlp", {"depth": 3, "width": 32}, data.info, sigma=0.0, noise="gaussian", seed=0)
    save_checkpoint(path, Checkpoint(model.state_dict(), metadata))
    return path


@pytest.mark.parametrize("method", ["admm", "lb"])
def test_quantize_writes_checkpoint_codes_and_config(run, checkpoint, tmp_path, method):
    output = tmp_path / f"{method}.pt"
    code, out, err = run(
        "quantize", checkpoint, "--method", method, "--bits", 4, "--iterations", 2, "--steps", 10, "--output", output
    )
    assert code == 0, err
    assert f"4-bit {method}" in out
    model, saved = load_model(output)  # readable by certify / attack
    assert saved.metadata["quantization"]["method"] == method and saved.metadata["model"] == "mlp"
    codes, _metadata = load_codes(output.with_suffix(".codes.pt"))
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            assert torch.equal(module.weight, codes[name].dequantize()) and int(codes[name].codes.abs().max()) <= 4
    config = json.loads(output.with_suffix(".json").read_text())
    assert config["config"]["iterations"] == 2 and len(config["history"]) == 3 and config["method"] == method
    code, out, _ = run("attack", output, "--attack", "fgsm", "--num-examples", 20)
    assert code == 0 and "fgsm" in out


def test_certified_quantization(run, checkpoint, tmp_path):
    pytest.importorskip("qrobust.bounds")
    output = tmp_path / "certified.pt"
    code, _out, err = run(
        "quantize",
        checkpoint,
        "--method",
        "admm",
        "--bits",
        6,
        "--certified",
        "--percentile",
        50,
        "--certify-images",
        20,
        "--iterations",
        2,
        "--steps",
        10,
        "--output",
        output,
    )
    assert code == 0, err
    config = json.loads(output.with_suffix(".json").read_text())
    epsilons = config["epsilons"]
    assert len(epsilons) == 3 and all(eps > 0 for eps in epsilons.values()) and config["percentile"] == 50
    assert {layer["name"]: layer["epsilon"] for layer in config["layers"]} == epsilons  # by layer name


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "fancy"], "method must be one of int8, admm, lb"),
        (["--method", "admm", "--bits", 1], "bits must be an integer in 2..8"),
        (["--method", "admm", "--iterations", 0], "iterations must be an integer >= 1"),
        (["--method", "lb", "--certified"], "--certified applies to --method admm"),
        (["--method", "admm", "--percentile", 50], "--percentile applies to --certified"),
        (["--method", "admm", "--certified", "--percentile", 120], "percentile must be in [0, 100]"),
        (["--bits", 4], "--bits need --method admm or lb"),
    ],
)
def test_bad_input_is_one_error_line(run, checkpoint, tmp_path, args, message):
    code, _out, err = run("quantize", checkpoint, *args, "--output", tmp_path / "out.pt")
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "out.pt").exists()
