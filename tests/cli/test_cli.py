"""End-to-end runs of the command line on a tiny digits model, and its error paths."""

import json
import subprocess
import sys

import pytest
import torch

from qrobust.data import dataset_info
from qrobust.models import build_model
from qrobust.models.checkpoint import Checkpoint, model_metadata, save_checkpoint
from qrobust.quant import load_int8
from qrobust.smoothing import CERTIFY_SAMPLES_HEADER, PREDICT_HEADER, read_certify_tsv


def test_train_writes_metadata(checkpoint):
    payload = torch.load(checkpoint, weights_only=True)
    metadata = json.loads(payload["metadata"])
    assert metadata["model"] == "mlp" and metadata["model_options"] == {"depth": 2, "width": 32}
    assert metadata["sigma"] == 0.25 and metadata["epochs_done"] == 2 and metadata["seed"] == 0
    assert metadata["dataset"]["name"] == "digits" and 0.5 < metadata["accuracy"]["clean"] <= 1
    assert {"qrobust", "torch", "python"} <= set(metadata["versions"])


def test_certify_predict_analyze(run, checkpoint, tmp_path):
    tsv = tmp_path / "certify.tsv"
    settings = ("--sigma", 0.25, "--n0", 20, "--n", 200, "--alpha", 0.01, "--num-examples", 12)
    code, out, _ = run("certify", checkpoint, *settings, "--output", tsv)
    assert code == 0, out
    lines = tsv.read_text().splitlines()
    assert lines[0] == CERTIFY_SAMPLES_HEADER and len(lines) == 13
    rows = read_certify_tsv(tsv)
    assert [row.idx for row in rows] == [i * 450 // 12 for i in range(12)]
    assert all(row.radius > 0 for row in rows if row.predict != -1)
    assert sum(row.correct for row in rows) >= 6
    config = json.loads(tsv.with_suffix(".json").read_text())
    assert config["n"] == 200 and config["sigma"] == 0.25 and config["model"]["model"] == "mlp"

    again = tmp_path / "again.tsv"
    run("certify", checkpoint, *settings, "--output", again)
    assert [line.split("\t")[:4] for line in again.read_text().splitlines()] == [line.split("\t")[:4] for line in lines]

    predictions = tmp_path / "predict.tsv"
    code, out, _ = run(
        "predict",
        checkpoint,
        "--sigma",
        0.25,
        "--n",
        200,
        "--alpha",
        0.01,
        "--num-examples",
        5,
        "--output",
        predictions,
    )
    assert code == 0 and predictions.read_text().splitlines()[0] == PREDICT_HEADER
    assert len(predictions.read_text().splitlines()) == 6

    plot = tmp_path / "plot.png"
    code, out, _ = run("analyze", tsv, again, "--label", "first", "--label", "second", "--plot", plot)
    assert code == 0 and "ACR" in out and "first" in out and "second" in out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


BAD_CERTIFY_ARGUMENTS = [
    (["--sigma", "0"], "sigma must be"),
    (["--sigma", "-0.5"], "sigma must be"),
    (["--sigma", "0.25", "--alpha", "0"], "alpha must be in (0, 1)"),
    (["--sigma", "0.25", "--alpha", "1.5"], "alpha must be in (0, 1)"),
    (["--sigma", "0.25", "--n0", "0"], "--n0 must be"),
    (["--sigma", "0.25", "--n", "0"], "--n must be"),
    (["--sigma", "0.25", "--batch-size", "0"], "--batch-size must be"),
    (["--sigma", "0.25", "--num-examples", "0"], "--num-examples must be"),
    (["--sigma", "0.25", "--num-examples", "100000"], "--num-examples must be at most 450"),
    (["--sigma", "0.25", "--seed", "-1"], "--seed must be an integer >= 0"),
    (["--sigma", "not-a-number"], "Invalid value for '--sigma'"),
]


@pytest.mark.parametrize(("arguments", "message"), BAD_CERTIFY_ARGUMENTS)
def test_bad_certify_arguments_give_one_line_and_exit_2(run, checkpoint, tmp_path, arguments, message):
    output = tmp_path / "out.tsv"
    code, _, err = run("certify", checkpoint, "--output", output, *arguments)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err
    assert not output.exists()


def test_missing_data_root(run, tmp_path):
    info = dataset_info("mnist")
    path = tmp_path / "mnist.pt"
    save_checkpoint(path, Checkpoint(build_model("mlp", info).state_dict(), model_metadata("mlp", {}, info)))
    code, _, err = run(
        "certify", path, "--sigma", 0.25, "--data-root", tmp_path / "nowhere", "--output", tmp_path / "o.tsv"
    )
    assert code == 2 and err.count("\n") == 1 and "MNIST not found" in err and "t10k-images-idx3-ubyte" in err
    assert not (tmp_path / "o.tsv").exists()


def test_bad_checkpoints(run, tmp_path, checkpoint):
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(checkpoint.read_bytes()[:1000])
    evil = tmp_path / "evil.pt"
    torch.save({"format": "qrobust-checkpoint", "code": _Payload(tmp_path / "pwned")}, evil)
    for path, message in [
        (truncated, "truncated or corrupt"),
        (evil, "pickled Python objects"),
        (tmp_path / "absent.pt", "not found"),
    ]:
        code, _, err = run("certify", path, "--sigma", 0.25, "--output", tmp_path / "out.tsv")
        assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "pwned").exists()


def test_existing_results_are_never_overwritten_by_accident(run, checkpoint, tmp_path):
    output = tmp_path / "kept.tsv"
    output.write_text("precious\n")
    code, _, err = run("certify", checkpoint, "--sigma", 0.25, "--output", output)
    assert code == 2 and "--overwrite" in err and output.read_text() == "precious\n"
    code, _, err = run("train", "--dataset", "digits", "--output", checkpoint)
    assert code == 2 and "--resume" in err


def test_train_errors(run, tmp_path):
    code, _, err = run("train", "--dataset", "cifar10", "--data-root", tmp_path, "--output", tmp_path / "m.pt")
    assert code == 2 and "cifar-10-binary.tar.gz" in err and err.count("\n") == 1
    code, _, err = run(
        "train", "--dataset", "digits", "--model", "mlp", "--model-option", "depth=1", "--output", tmp_path / "m.pt"
    )
    assert code == 2 and "depth" in err
    code, _, err = run("train", "--dataset", "imagenet", "--output", tmp_path / "m.pt")
    assert code == 2 and "fashion-mnist" in err
    assert not (tmp_path / "m.pt").exists()


def test_analyze_errors(run, tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text("hello\n")
    code, _, err = run("analyze", bad)
    assert code == 2 and "not a certification TSV" in err
    code, _, err = run("analyze", tmp_path / "absent.tsv")
    assert code == 2 and "cannot read" in err


def test_certify_help_documents_every_option_with_units(run, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # one line per option, so phrases are not wrapped apart
    code, out, _ = run("certify", "--help")
    assert code == 0
    for option in [
        "--sigma",
        "--n0",
        "--n ",
        "--alpha",
        "--num-examples",
        "--split",
        "--data-root",
        "--batch-size",
        "--seed",
        "--output",
        "--overwrite",
    ]:
        assert option in out
    assert "pixel units" in out and "(0, 1)" in out


def test_a_real_process_prints_no_traceback(tmp_path):
    finished = subprocess.run(
        [
            sys.executable,
            "-m",
            "qrobust",
            "certify",
            str(tmp_path / "absent.pt"),
            "--sigma",
            "-1",
            "--output",
            str(tmp_path / "o.tsv"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert finished.returncode == 2
    assert finished.stderr.strip() == "error: sigma must be a finite number > 0, got -1.0"


class _Payload:
    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_quantization_aware_flow_to_integer_certification(run, checkpoint, tmp_path):
    qat = tmp_path / "qat.pt"
    code, out, err = run(
        "train",
        "--init",
        checkpoint,
        "--qat",
        "--noise",
        "discrete",
        "--sigma",
        0.25,
        "--epochs",
        1,
        "--batch-size",
        64,
        "--lr",
        0.01,
        "--output",
        qat,
    )
    assert code == 0, err
    assert "quantization-aware mlp" in out
    int8 = tmp_path / "model.int8.pt"
    code, out, err = run("quantize", qat, "--output", int8)
    assert code == 0, err
    assert "int8 model (qat)" in out and "agreement with the float model" in out
    results = {}
    for method, fast in [("int", "--fast"), ("int", "--no-fast"), ("float-quant", "--fast")]:
        tsv = tmp_path / f"{method}{fast}.tsv"
        code, _, err = run(
            "certify",
            int8,
            "--method",
            method,
            fast,
            "--noise-bank",
            "--sigma",
            0.25,
            "--n0",
            20,
            "--n",
            200,
            "--alpha",
            0.01,
            "--num-examples",
            6,
            "--output",
            tsv,
        )
        assert code == 0, err
        results[method, fast] = [(row.predict, row.radius) for row in read_certify_tsv(tsv)]
        assert json.loads(tsv.with_suffix(".json").read_text())["method"] == method
    assert sum(predict != -1 for predict, _ in results["int", "--fast"]) >= 3
    # the fast int8 backend and the integer reference engine certify alike on this model
    assert results["int", "--fast"] == results["int", "--no-fast"]


def test_method_and_model_file_must_match(run, checkpoint, tmp_path):
    code, _, err = run("certify", checkpoint, "--method", "int", "--sigma", 0.25, "--output", tmp_path / "o.tsv")
    assert code == 2 and "not a qrobust int8 model" in err
    code, _, err = run("certify", checkpoint, "--method", "integer", "--sigma", 0.25, "--output", tmp_path / "o.tsv")
    assert code == 2 and "method must be one of float-fp, float-quant, int" in err
    assert not (tmp_path / "o.tsv").exists() and not (tmp_path / "o.json").exists()


def test_float_checkpoint_is_calibrated_for_post_training_quantization(run, checkpoint, tmp_path):
    code, out, err = run("quantize", checkpoint, "--calibration-images", 64, "--output", tmp_path / "ptq.int8.pt")
    assert code == 0, err
    assert "int8 model (ptq)" in out
    assert load_int8(tmp_path / "ptq.int8.pt").model.input_margin == 0


def test_post_training_quantization_takes_an_input_margin(run, checkpoint, tmp_path):
    code, _, err = run(
        "quantize", checkpoint, "--calibration-images", 64, "--input-margin", 40, "--output", tmp_path / "m.int8.pt"
    )
    assert code == 0, err
    assert load_int8(tmp_path / "m.int8.pt").model.input_margin == 40
    for args, message in (
        (["--input-margin", -1], "input_margin"),
        (["--method", "admm", "--input-margin", 40], "--input-margin applies to --method int8"),
    ):
        code, _, err = run("quantize", checkpoint, *args, "--output", tmp_path / "bad.pt")
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
        assert not (tmp_path / "bad.pt").exists()


def test_a_diverged_training_run_is_warned_in_one_line(run, tmp_path):
    code, _, err = run(
        "train",
        "--dataset",
        "digits",
        "--model",
        "mlp",
        "--model-option",
        "depth=2",
        "--model-option",
        "width=16",
        "--epochs",
        2,
        "--lr",
        1e4,
        "--output",
        tmp_path / "m.pt",
    )
    assert code == 0, err
    assert err.startswith("warning: epochs 1-2: training accuracy") and "UserWarning" not in err
    assert len(err.strip().splitlines()) == 1


def test_low_bit_adversarial_training_then_attack_table(run, tmp_path):
    path = tmp_path / "br.pt"
    code, out, err = run(
        "train",
        "--dataset",
        "digits",
        "--model",
        "mlp",
        "--model-option",
        "depth=2",
        "--model-option",
        "width=32",
        "--loss",
        "tradeoff",
        "--alpha",
        1,
        "--beta",
        2,
        "--eps",
        0.1,
        "--step-size",
        0.05,
        "--attack-steps",
        2,
        "--quant",
        "br",
        "--bits",
        2,
        "--rho",
        2,
        "--cutoff-epoch",
        1,
        "--epochs",
        2,
        "--batch-size",
        64,
        "--lr",
        0.05,
        "--output",
        path,
    )
    assert code == 0, err
    assert "tradeoff loss" in out and "2-bit weights by br" in out and "of conv channels" in out
    metadata = json.loads(torch.load(path, weights_only=True)["metadata"])
    assert metadata["train_config"]["quant"] == "br" and "zero_weights" in metadata["sparsity"]
    weights = torch.load(path, weights_only=True)["state_dict"]
    assert all(weights[k].unique().numel() <= 3 for k in weights if k.endswith("weight") and weights[k].dim() == 2)

    report = tmp_path / "attacks.json"
    code, out, err = run(
        "attack",
        path,
        "--attack",
        "fgsm",
        "--attack",
        "pgd",
        "--attack",
        "pgd-l2",
        "--eps",
        0.1,
        "--steps",
        5,
        "--num-examples",
        40,
        "--output",
        report,
    )
    assert code == 0, err
    accuracy = json.loads(report.read_text())["accuracy"]["br.pt"]
    assert list(accuracy) == ["natural", "fgsm", "pgd", "pgd-l2"]
    assert accuracy["natural"] >= accuracy["fgsm"] and accuracy["natural"] >= accuracy["pgd"]
    assert "PGD(norm='inf', eps=0.1" in out


def test_attack_transfers_to_the_int8_model_and_smoothed_attacks_run(run, checkpoint, tmp_path):
    qat, int8 = tmp_path / "qat.pt", tmp_path / "mlp.int8.pt"
    assert run("train", "--init", checkpoint, "--qat", "--sigma", 0.25, "--epochs", 1, "--output", qat)[0] == 0
    assert run("quantize", qat, "--output", int8)[0] == 0
    report = tmp_path / "transfer.json"
    code, out, err = run(
        "attack",
        qat,
        "--int8",
        int8,
        "--attack",
        "ifgsm",
        "--eps",
        0.1,
        "--steps",
        3,
        "--num-examples",
        30,
        "--output",
        report,
    )
    assert code == 0, err
    accuracy = json.loads(report.read_text())["accuracy"]
    assert set(accuracy) == {"qat.pt", "mlp.int8.pt"}
    assert abs(accuracy["qat.pt"]["natural"] - accuracy["mlp.int8.pt"]["natural"]) <= 0.1  # twins agree
    code, out, err = run(
        "attack", checkpoint, "--sigma", 0.25, "--samples", 4, "--attack", "pgd-l2", "--steps", 2, "--num-examples", 10
    )
    assert code == 0, err
    assert "smoothed sigma 0.25" in out


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--attack", "deepfool"], "unknown attack(s) deepfool"),
        (["--eps", -1], "eps"),
        (["--sigma", -0.5], "sigma"),
        (["--steps", 0], "steps"),
    ],
)
def test_attack_errors_are_one_line(run, checkpoint, arguments, message):
    code, _, err = run("attack", checkpoint, *arguments, "--num-examples", 5)
    assert code == 2 and message in err and "Traceback" not in err


def test_train_rejects_contradictory_losses(run, tmp_path):
    code, _, err = run(
        "train", "--dataset", "digits", "--loss", "natural", "--sigma", 0.25, "--output", tmp_path / "x.pt"
    )
    assert code == 2 and "use loss 'gaussian'" in err
    code, _, err = run("train", "--dataset", "digits", "--quant", "br", "--qat", "--output", tmp_path / "y.pt")
    assert code == 2 and "cannot be combined" in err


def test_input_margin_flows_from_training_to_integer_certification(run, checkpoint, tmp_path):
    qat, int8, tsv = tmp_path / "qat.pt", tmp_path / "m.int8.pt", tmp_path / "int.tsv"
    code, _, err = run(
        "train",
        "--init",
        checkpoint,
        "--qat",
        "--input-margin",
        64,
        "--noise",
        "discrete",
        "--sigma",
        0.25,
        "--epochs",
        1,
        "--output",
        qat,
    )
    assert code == 0, err
    assert json.loads(torch.load(qat, weights_only=True)["metadata"])["qat"]["input_margin"] == 64
    assert run("quantize", qat, "--output", int8)[0] == 0
    code, _, err = run(
        "certify", int8, "--method", "int", "--sigma", 0.25, "--n0", 10, "--n", 50, "--num-examples", 3, "--output", tsv
    )
    assert code == 0, err
    code, _, err = run("train", "--dataset", "digits", "--input-margin", 64, "--output", tmp_path / "x.pt")
    assert code == 2 and "add --qat" in err
