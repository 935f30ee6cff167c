"""`qrobust search` and `qrobust finetune` on a tiny digits CNN, then `qrobust certify` of the result; error paths."""

import json
import sys

import pytest
import torch

from qrobust.cli import main
from qrobust.data import load_dataset
from qrobust.models import build_model
from qrobust.models.checkpoint import Checkpoint, load_checkpoint, model_metadata, save_checkpoint
from qrobust.quant.bitops import BitPolicy, bitops_percent, layer_infos
from qrobust.smoothing import read_certify_tsv
from qrobust.train import TrainConfig, train

TINY = (
    "--finetune-images",
    200,
    "--validation-images",
    10,
    "--n0",
    20,
    "--n",
    100,
    "--n-zeta",
    50,
    "--batch-size",
    64,
    "--warmup",
    1,
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A float cnn noise-trained on digits at sigma 0.25."""
    data = load_dataset("digits", "train")
    torch.manual_seed(0)
    model = build_model("cnn", data.info)
    train(model, data, TrainConfig(epochs=4, batch_size=32, lr=0.05, sigma=0.25), progress=False)
    path = tmp_path_factory.mktemp("model") / "cnn.pt"
    save_checkpoint(path, Checkpoint(model.state_dict(), model_metadata("cnn", {}, data.info, sigma=0.25)))
    return path


@pytest.fixture(scope="module")
def searched(checkpoint, tmp_path_factory):
    """The output directory of a 3-episode search at 3% BitOPs, run through the command line."""
    output = tmp_path_factory.mktemp("search") / "out"
    argv = ["qrobust", "search", checkpoint, "--sigma", 0.25, "--budget", 3, "--episodes", 3, *TINY, "--output", output]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", list(map(str, argv)))
        with pytest.raises(SystemExit) as exit_info:
            main()
    assert exit_info.value.code == 0
    return output


def test_search_writes_policy_log_and_checkpoint(searched, run, checkpoint):
    policy = BitPolicy.load(searched / "policy.json")
    model, info = build_model("cnn", load_dataset("digits", "test").info), load_dataset("digits", "test").info
    layers = layer_infos(model, info.shape)
    assert policy.weight_bits[0] == policy.weight_bits[-1] == 8 and bitops_percent(layers, policy) <= 3
    lines = (searched / "search.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines[1:]]
    assert json.loads(lines[0])["header"]["budget"] == 3 and [r["episode"] for r in records] == [0, 1, 2]
    assert {"policy", "bitops_percent", "reward", "acr", "accuracy", "seconds"} <= set(records[0])
    best = max(records, key=lambda r: r["reward"])
    assert BitPolicy.from_dict(best["policy"]) == policy
    saved = load_checkpoint(searched / "best.pt")
    assert saved.metadata["bit_policy"] == policy.to_dict() and saved.metadata["search"]["episode"] == best["episode"]
    fixed = BitPolicy.load(searched / "fixed-policy.json")
    assert bitops_percent(layers, fixed) <= 3 < bitops_percent(layers, BitPolicy.uniform(4, fixed.weight_bits[1] + 1))
    config = json.loads((searched / "config.json").read_text())
    assert config["reward"] == "arq" and config["budget"] == 3 and config["model"]["model"] == "cnn"

    code, out, _ = run(
        "search", checkpoint, "--sigma", 0.25, "--budget", 3, "--episodes", 4, *TINY, "--output", searched
    )
    assert code == 0 and "resuming" in out
    lines = (searched / "search.jsonl").read_text().splitlines()
    assert [json.loads(line)["episode"] for line in lines[1:]] == [0, 1, 2, 3]


def test_finetune_then_certify(searched, run, checkpoint, tmp_path):
    tuned = tmp_path / "tuned.pt"
    code, out, err = run(
        "finetune",
        checkpoint,
        "--policy",
        searched / "policy.json",
        "--sigma",
        0.25,
        "--epochs",
        2,
        "--lr",
        0.01,
        "--batch-size",
        64,
        "--calibration-images",
        64,
        "--output",
        tuned,
    )
    assert code == 0, err
    assert "test accuracy" in out
    saved = load_checkpoint(tuned)
    assert saved.metadata["bit_policy"] == BitPolicy.load(searched / "policy.json").to_dict()
    assert saved.metadata["epochs_done"] == 2 and saved.metadata["accuracy"]["clean"] > 0.5
    tsv = tmp_path / "certify.tsv"
    code, out, err = run(
        "certify",
        tuned,
        "--method",
        "float-fp",
        "--sigma",
        0.25,
        "--n0",
        10,
        "--n",
        100,
        "--num-examples",
        5,
        "--output",
        tsv,
    )
    assert code == 0, err
    assert len(read_certify_tsv(tsv)) == 5


def test_errors_are_one_line(searched, run, checkpoint, tmp_path):
    other_model = tmp_path / "five-layers.json"
    BitPolicy.uniform(5, 4).save(other_model)
    cases = [
        (
            (
                "finetune",
                checkpoint,
                "--policy",
                tmp_path / "missing.json",
                "--sigma",
                0.25,
                "--output",
                tmp_path / "a.pt",
            ),
            "policy file not found",
        ),
        (
            ("finetune", checkpoint, "--policy", other_model, "--sigma", 0.25, "--output", tmp_path / "b.pt"),
            "policy for another model",
        ),
        (
            ("finetune", checkpoint, "--policy", checkpoint, "--sigma", 0.25, "--output", tmp_path / "c.pt"),
            "not a JSON bit policy",
        ),
        (
            ("finetune", checkpoint, "--policy", searched / "policy.json", "--sigma", 0.25, "--output", checkpoint),
            "exists",
        ),
        (
            (
                "finetune",
                searched / "best.pt",
                "--policy",
                searched / "policy.json",
                "--sigma",
                0.25,
                "--output",
                tmp_path / "d.pt",
            ),
            "starts from a float checkpoint",
        ),
        (
            ("search", checkpoint, "--sigma", 0.25, "--budget", 0, "--output", tmp_path / "s"),
            "budget must be a percentage in (0, 100]",
        ),
        (
            ("search", checkpoint, "--sigma", 0.25, "--budget", 150, "--output", tmp_path / "s"),
            "budget must be a percentage in (0, 100]",
        ),
        (("search", checkpoint, "--sigma", 0.25, "--budget", 0.2, "--output", tmp_path / "s"), "out of reach"),
        (
            ("search", checkpoint, "--sigma", 0.25, "--budget", 3, "--reward", "accuracy", "--output", tmp_path / "s"),
            "reward must be one of arq, certified, haq",
        ),
        (
            ("search", checkpoint, "--sigma", 0.25, "--budget", 3, "--certifier", "exact", "--output", tmp_path / "s"),
            "certifier must be one of irs, rs",
        ),
        (("search", tmp_path / "nothing.pt", "--sigma", 0.25, "--budget", 3), "checkpoint not found"),
        (("search", checkpoint, "--sigma", 0.5, "--budget", 3, *TINY, "--output", searched), "different sigma"),
    ]
    for args, message in cases:
        code, _, err = run(*args)
        assert code == 2, args
        assert err.count("\n") == 1 and err.startswith("error:") and message in err, err
    assert not (tmp_path / "s").exists()
