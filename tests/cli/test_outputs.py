"""What the commands write: nothing a user wrote is replaced without --overwrite, a refused or failed run
leaves no file behind, and a second writer of one result refuses. Real processes: exit code, one
``error:`` line on stderr, and the files that were there byte for byte the same."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from qrobust.errors import QRobustError
from qrobust.jobs import SmoothingJob
from qrobust.outputs import atomic_path, exclusive_lock
from qrobust.smoothing import CERTIFY_HEADER, CertifyRow, read_certify_tsv

QUICK = ("--sigma", "0.25", "--n", "200", "--alpha", "0.01", "--num-examples", "4")
# About 0.1 s per example on one thread (as in test_resume), 45 s for the whole split: a run still going
# while a second process starts; it is killed as soon as the second has been refused.
SLOW = (
    "--sigma",
    "0.25",
    "--n0",
    "20",
    "--n",
    "30000",
    "--alpha",
    "0.01",
    "--num-examples",
    "450",
    "--batch-size",
    "1000",
)
ENVIRONMENT = os.environ | {"OMP_NUM_THREADS": "1"}


def _qrobust(*args):
    return subprocess.run(
        [sys.executable, "-m", "qrobust", *map(str, args)], capture_output=True, text=True, env=ENVIRONMENT, check=False
    )


def _files(directory):
    """Every file under ``directory`` with its bytes."""
    return {
        str(path.relative_to(directory)): path.read_bytes() for path in sorted(directory.rglob("*")) if path.is_file()
    }


def _refused(finished, *words):
    """The process exited with code 2 and one ``error:`` line holding ``words``."""
    assert finished.returncode == 2, finished.stderr
    assert finished.stderr.count("\n") == 1 and finished.stderr.startswith("error: "), finished.stderr
    assert all(word in finished.stderr for word in words), finished.stderr


@pytest.mark.parametrize("command", ["certify", "predict"])
def test_the_run_config_does_not_replace_another_result(checkpoint, tmp_path, command):
    precious = tmp_path / "result.json"
    precious.write_text('{"command": "attack", "accuracy": {"natural": 0.9}}\n')
    before = _files(tmp_path)
    finished = _qrobust(command, checkpoint, *QUICK, "--output", tmp_path / "result.tsv")
    _refused(finished, str(precious), "--overwrite")
    assert _files(tmp_path) == before


def test_the_own_run_config_of_a_removed_result_is_replaced(run, checkpoint, tmp_path):
    output = tmp_path / "run.tsv"
    assert run("certify", checkpoint, *QUICK, "--output", output)[0] == 0
    output.unlink()
    code, _, err = run("certify", checkpoint, *QUICK, "--output", output)
    assert code == 0, err
    assert len(read_certify_tsv(output)) == 4


def test_a_refused_run_leaves_no_file(checkpoint, tmp_path):
    finished = _qrobust("certify", checkpoint, *QUICK, "--seed", "-1", "--output", tmp_path / "run.tsv")
    _refused(finished, "--seed")
    assert _files(tmp_path) == {}


def test_a_run_failing_before_its_first_row_leaves_the_files_as_they_were(run, checkpoint, tmp_path, monkeypatch):
    kept = tmp_path / "run.tsv"
    kept.write_text("precious\n")
    before = _files(tmp_path)

    def fail(*_):
        raise ValueError("the base model failed")

    monkeypatch.setattr(SmoothingJob, "rows", fail)
    code, _, err = run("certify", checkpoint, *QUICK, "--output", kept, "--overwrite")
    assert code == 2 and err == "error: the base model failed\n"
    assert _files(tmp_path) == before  # neither replaced nor a run config, lock or temporary file left
    code, _, err = run("certify", checkpoint, *QUICK, "--output", tmp_path / "new.tsv")
    assert code == 2 and _files(tmp_path) == before


def test_a_second_writer_of_a_running_certification_refuses(checkpoint, tmp_path):
    output = tmp_path / "run.tsv"
    first = subprocess.Popen(
        [sys.executable, "-m", "qrobust", "certify", str(checkpoint), *SLOW, "--output", str(output)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=ENVIRONMENT,
    )
    try:
        started = time.monotonic()
        while first.poll() is None and (not output.exists() or len(output.read_bytes().splitlines()) < 2):
            time.sleep(0.02)  # until the first run holds the lock and has written rows
            assert time.monotonic() - started < 60
        assert first.poll() is None, "the first run ended before the second started: make SLOW slower"
        second = _qrobust("certify", checkpoint, *SLOW, "--output", output, "--resume")
        assert first.poll() is None
        _refused(second, str(output), f"process {first.pid}", "qrobust certify")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    rows = read_certify_tsv(output, interrupted=True)  # the first run's rows, each example once, in order
    assert [row.idx for row in rows] == list(range(len(rows)))


def test_two_runs_started_together_one_refuses(checkpoint, tmp_path):
    output = tmp_path / "run.tsv"
    command = [sys.executable, "-m", "qrobust", "certify", str(checkpoint), *QUICK, "--output", str(output)]
    processes = [
        subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENVIRONMENT)
        for _ in range(2)
    ]
    results = sorted((process.wait(), process.stderr.read()) for process in processes)
    assert [code for code, _ in results] == [0, 2]
    assert results[1][1].count("\n") == 1 and results[1][1].startswith("error: ") and str(output) in results[1][1]
    assert len(read_certify_tsv(output)) == 4
    assert sorted(path.name for path in tmp_path.iterdir()) == ["run.json", "run.tsv"]


def test_analyze_plot_is_refused_where_it_would_replace_a_file_or_names_a_directory(tmp_path):
    tsv = tmp_path / "run.tsv"
    tsv.write_text("\n".join([CERTIFY_HEADER, CertifyRow(0, 1, 1, 0.5, 1.0).to_line()]) + "\n")
    plot = tmp_path / "plot.png"
    plot.write_bytes(b"precious")
    (tmp_path / "plots").mkdir()
    before = _files(tmp_path)
    _refused(_qrobust("analyze", tsv, "--plot", plot), str(plot), "--overwrite")
    _refused(_qrobust("analyze", tsv, "--plot", tmp_path / "plots"), "is a directory")
    _refused(_qrobust("analyze", tsv, "--plot", tmp_path / "plot"), ".png")
    assert _files(tmp_path) == before and not any((tmp_path / "plots").iterdir())
    finished = _qrobust("analyze", tsv, "--plot", plot, "--overwrite")
    assert finished.returncode == 0, finished.stderr
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["plot.png", "plots", "run.tsv"]  # no temporary file


def test_report_is_refused_where_it_would_replace_an_earlier_one(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    (results / "run.tsv").write_text("\n".join([CERTIFY_HEADER, CertifyRow(0, 1, 1, 0.5, 1.0).to_line()]) + "\n")
    report = tmp_path / "report"
    report.mkdir()
    (report / "README.md").write_text("my notes\n")
    before = _files(tmp_path)
    _refused(_qrobust("report", results, "--output", report), str(report / "README.md"), "--overwrite")
    assert _files(tmp_path) == before
    _refused(_qrobust("report", results, "--output", results / "run.tsv"), "is a file")
    finished = _qrobust("report", results, "--output", report, "--overwrite")
    assert finished.returncode == 0, finished.stderr
    assert sorted(path.name for path in report.iterdir()) == ["README.md", "group-1.png"]  # no temporary file


@pytest.mark.parametrize("command", ["train", "quantize"])
def test_an_unwritable_output_is_refused_before_any_work(checkpoint, tmp_path, command):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory\n")
    before = _files(tmp_path)
    if command == "train":
        finished = _qrobust(
            "train", "--dataset", "digits", "--model", "mlp", "--epochs", "1", "--output", blocker / "m.pt"
        )
    else:
        finished = _qrobust("quantize", checkpoint, "--output", blocker / "m.int8.pt")
    _refused(finished, "cannot write into", str(blocker))
    assert finished.stdout == ""  # refused before training or calibrating
    assert _files(tmp_path) == before


@pytest.mark.parametrize("command", ["certify", "train"])
def test_overwrite_onto_a_directory_is_refused_and_leaves_nothing_beside_it(checkpoint, tmp_path, command):
    directory = tmp_path / "results"
    (directory / "kept.txt").parent.mkdir()
    (directory / "kept.txt").write_text("kept\n")
    before = _files(tmp_path)
    if command == "certify":
        finished = _qrobust("certify", checkpoint, *QUICK, "--output", directory, "--overwrite")
    else:
        finished = _qrobust(
            "train", "--dataset", "digits", "--model", "mlp", "--epochs", "1", "--output", directory, "--overwrite"
        )
    _refused(finished, f"--output {directory} is a directory")
    assert _files(tmp_path) == before and sorted(path.name for path in tmp_path.iterdir()) == ["results"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_directory_is_refused_before_training(tmp_path):
    tmp_path.chmod(0o555)
    try:
        finished = _qrobust(
            "train", "--dataset", "digits", "--model", "mlp", "--epochs", "1", "--output", tmp_path / "m.pt"
        )
    finally:
        tmp_path.chmod(0o755)
    _refused(finished, "is not writable")
    assert finished.stdout == ""


def test_analyze_refuses_a_bad_row_with_its_line(checkpoint, tmp_path):
    tsv = tmp_path / "run.tsv"
    tsv.write_text(
        "\n".join([CERTIFY_HEADER, CertifyRow(0, 1, 1, 0.5, 1.0).to_line(), "9\t2\t2\tnan\t1\t0:00:01"]) + "\n"
    )
    _refused(_qrobust("analyze", tsv), f"{tsv}, line 3", "radius")
    tsv.write_text("\n".join([CERTIFY_HEADER, CertifyRow(0, 12, 12, 0.5, 1.0).to_line()]) + "\n")
    tsv.with_suffix(".json").write_text(json.dumps({"model": {"dataset": {"classes": [str(c) for c in range(10)]}}}))
    _refused(_qrobust("analyze", tsv), "line 2", "< 10")


def test_train_documents_and_checks_its_bits(run, tmp_path):
    code, out, _ = run("train", "--help")
    assert code == 0 and "1..8" in out
    code, _, err = run(
        "train",
        "--dataset",
        "digits",
        "--model",
        "mlp",
        "--epochs",
        "1",
        "--quant",
        "bc",
        "--bits",
        "3",
        "--output",
        tmp_path / "3bit.pt",
    )
    assert code == 0, err
    weights = torch.load(tmp_path / "3bit.pt", weights_only=True)["state_dict"]
    assert all(
        weight.unique().numel() <= 7 for name, weight in weights.items() if name.endswith("weight") and weight.dim() > 1
    )
    code, _, err = run("train", "--dataset", "digits", "--quant", "bc", "--bits", "9", "--output", tmp_path / "m.pt")
    assert code == 2 and err == "error: --bits must be in 1..8, got 9\n"
    assert not (tmp_path / "m.pt").exists()


def test_the_lock_names_its_holder_and_no_lock_or_temporary_file_stays(tmp_path):
    target = tmp_path / "run.tsv"
    with exclusive_lock(target):
        assert (tmp_path / "run.tsv.lock").read_text().startswith(f"process {os.getpid()}: qrobust")
        with (
            pytest.raises(QRobustError, match=rf"run.tsv is being written by another run \(process {os.getpid()}: "),
            exclusive_lock(target),
        ):
            pass
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError), atomic_path(target) as temporary:
        temporary.write_text("half")
        raise RuntimeError
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["train", "--dataset", "digits", "--epochs", "0"], "--epochs must be an integer >= 1, got 0"),
        (["train", "--dataset", "digits", "--seed", "-1"], "--seed must be an integer >= 0, got -1"),
        (["predict", "absent.pt", "--sigma", "0.25", "--n", "0"], "--n must be an integer >= 1, got 0"),
        (["attack", "absent.pt", "--seed", "-3"], "--seed must be an integer >= 0, got -3"),
        (["weight-bound", "absent.pt", "--num-examples", "0"], "--num-examples must be an integer >= 1, got 0"),
        (
            ["search", "absent.pt", "--sigma", "0.25", "--budget", "5", "--episodes", "0"],
            "--episodes must be an integer >= 1, got 0",
        ),
    ],
)
def test_count_and_seed_errors_name_the_option_before_reading_anything(run, tmp_path, arguments, message):
    code, _, err = run(*arguments, *(["--output", tmp_path / "out"] if arguments[0] in ("train", "predict") else []))
    assert code == 2 and err == f"error: {message}\n"
    assert list(tmp_path.iterdir()) == []
