"""Memory refusals on the command line: one `error:` line naming the size and the limit, exit code 2,
no output file, before the big allocation (subprocesses, as a user runs them)."""

import subprocess
import sys
import time

import pytest

from qrobust.data import dataset_info
from qrobust.models import build_model
from qrobust.models.checkpoint import Checkpoint, model_metadata, save_checkpoint


@pytest.fixture(scope="module")
def fashion_cnn(tmp_path_factory):
    """An untrained Fashion-MNIST-shaped CNN: the refusals come before any data is read."""
    info = dataset_info("fashion-mnist")
    path = tmp_path_factory.mktemp("model") / "cnn.pt"
    save_checkpoint(path, Checkpoint(build_model("cnn", info).state_dict(), model_metadata("cnn", {}, info)))
    return path


def _refused(tmp_path, *args):
    """Run ``qrobust ARGS --output OUT.tsv``; check the one-line refusal and that nothing was written."""
    output = tmp_path / "out.tsv"
    start = time.monotonic()
    finished = subprocess.run(
        [sys.executable, "-m", "qrobust", *map(str, args), "--output", str(output)],
        capture_output=True,
        text=True,
        check=False,
    )
    elapsed = time.monotonic() - start
    lines = finished.stderr.strip().splitlines()
    assert finished.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), finished.stderr
    assert sorted(tmp_path.iterdir()) == []  # neither out.tsv nor out.json (nor a .tmp)
    assert elapsed < 20  # about 2 s on an idle 2-core machine, most of it importing torch
    return lines[0]


@pytest.mark.parametrize("command", ["certify", "predict"])
def test_n_of_10_to_the_12_is_refused(checkpoint, tmp_path, command):
    line = _refused(tmp_path, command, checkpoint, "--sigma", "0.25", "--n", 10**12, "--num-examples", 1)
    assert line == (
        "error: n = 1,000,000,000,000 noisy samples (an int64 prediction each) needs ~7,451 GiB, above the "
        f"memory limit of {line.split('memory limit of ')[1].split(' GiB')[0]} GiB; pass --memory-limit "
        "to raise it or lower --n"
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--batch-size", 10**6, "--memory-limit", 64],
            "a batch of 1,000,000 noisy samples needs ~570 GiB, above the memory limit of 64 GiB",
        ),
        (
            ["--noise-bank", "--n", 3 * 10**6, "--memory-limit", 8],
            "a noise bank of 3,000,100 noise images of 1x28x28 needs ~8.76 GiB, above the memory limit of 8 GiB",
        ),
        (["--memory-limit", 0], "--memory-limit must be a number of GiB > 0, got 0.0"),
    ],
)
def test_a_batch_or_noise_bank_above_the_limit_is_refused(fashion_cnn, tmp_path, args, message):
    assert message in _refused(tmp_path, "certify", fashion_cnn, "--sigma", "0.25", *args)


def test_the_limit_can_be_raised(checkpoint, tmp_path):
    """A noise bank of n = 10^5 on 8x8 digits (0.024 GiB) is refused under 0.01 GiB and runs under 0.1 GiB."""
    args = ["predict", checkpoint, "--sigma", "0.25", "--noise-bank", "--n", 10**5, "--num-examples", 1]
    assert "needs ~0.0238 GiB, above the memory limit of 0.01 GiB" in _refused(tmp_path, *args, "--memory-limit", 0.01)
    output = tmp_path / "out.tsv"
    finished = subprocess.run(
        [sys.executable, "-m", "qrobust", *map(str, args), "--memory-limit", "0.1", "--output", str(output)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert finished.returncode == 0, finished.stderr
    assert len(output.read_text().splitlines()) == 2  # the header and one row
