"""Fixtures of the command-line tests: an in-process runner and a tiny trained digits model."""

import subprocess
import sys

import pytest

from qrobust.cli import main


@pytest.fixture
def run(monkeypatch, capsys):
    """Run ``qrobust ARGS`` in-process; returns (exit code, stdout, stderr)."""

    def invoke(*args):
        monkeypatch.setattr(sys, "argv", ["qrobust", *map(str, args)])
        with pytest.raises(SystemExit) as exit_info:
            main()
        out, err = capsys.readouterr()
        return exit_info.value.code, out, err

    return invoke


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "mlp.pt"
    command = [
        sys.executable,
        "-m",
        "qrobust",
        "train",
        "--dataset",
        "digits",
        "--model",
        "mlp",
        "--model-option",
        "depth=2",
        "--model-option",
        "width=32",
        "--sigma",
        "0.25",
        "--epochs",
        "2",
        "--batch-size",
        "64",
        "--lr",
        "0.05",
        "--output",
        str(path),
    ]
    finished = subprocess.run(command, capture_output=True, text=True, check=False)
    assert finished.returncode == 0, finished.stderr
    assert "test accuracy: clean" in finished.stdout
    return path
