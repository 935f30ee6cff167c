"""--device on the command line: auto and cpu run on the CPU here, an absent or unknown device is one line."""

import json

import pytest
import torch

SETTINGS = ("--sigma", "0.25", "--n0", "20", "--n", "500", "--alpha", "0.01", "--num-examples", "3")


def _columns(path):
    return [line.split("\t")[:5] for line in path.read_text().splitlines()]


def test_certify_on_auto_and_cpu_gives_the_same_rows_and_records_the_device(run, checkpoint, tmp_path):
    outputs = {device: tmp_path / f"{device}.tsv" for device in ("cpu", "auto")}
    for device, output in outputs.items():
        code, _, err = run("certify", checkpoint, *SETTINGS, "--device", device, "--output", output)
        assert code == 0, err
    assert _columns(outputs["cpu"]) == _columns(outputs["auto"])
    assert json.loads(outputs["auto"].with_suffix(".json").read_text())["device"] == "cpu"  # auto, resolved


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("command", ["certify", "train", "attack"])
def test_an_absent_gpu_is_one_line(run, checkpoint, tmp_path, command):
    args = {
        "certify": ("certify", checkpoint, *SETTINGS, "--output", tmp_path / "run.tsv"),
        "train": ("train", "--dataset", "digits", "--model", "mlp", "--epochs", "1", "--output", tmp_path / "m.pt"),
        "attack": ("attack", checkpoint, "--attack", "fgsm", "--num-examples", "4"),
    }[command]
    code, _, err = run(*args, "--device", "cuda")
    assert code == 2 and "device 'cuda' is not available" in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_an_unknown_device_is_refused_before_any_work(run, checkpoint, tmp_path):
    code, _, err = run("certify", checkpoint, *SETTINGS, "--device", "tpu", "--output", tmp_path / "run.tsv")
    assert code == 2 and "device must be one of" in err and len(err.strip().splitlines()) == 1


def test_train_and_attack_take_a_device(run, checkpoint, tmp_path):
    output = tmp_path / "m.pt"
    code, out, err = run(
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
        "1",
        "--batch-size",
        "64",
        "--lr",
        "0.05",
        "--device",
        "cpu",
        "--output",
        output,
    )
    assert code == 0 and output.exists(), err
    code, out, err = run("attack", checkpoint, "--attack", "fgsm", "--num-examples", "8", "--device", "auto")
    assert code == 0 and "fgsm" in out, err
