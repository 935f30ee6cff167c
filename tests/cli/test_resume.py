"""Crash-safe certification: a run killed at random moments and resumed equals an uninterrupted one."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from qrobust.smoothing import CERTIFY_SAMPLES_HEADER, read_certify_tsv

# 40 examples of about 0.1 s each on one thread: long enough that every kill lands mid-run.
SETTINGS = (
    "--sigma",
    "0.25",
    "--n0",
    "20",
    "--n",
    "30000",
    "--alpha",
    "0.01",
    "--num-examples",
    "40",
    "--batch-size",
    "1000",
)


def _columns(path):
    """Every column but the wall time."""
    return [line.split("\t")[:5] for line in path.read_text().splitlines()]


def test_killed_runs_resume_to_the_uninterrupted_result(run, checkpoint, tmp_path):
    reference = tmp_path / "reference.tsv"
    assert run("certify", checkpoint, *SETTINGS, "--output", reference)[0] == 0

    output = tmp_path / "killed.tsv"
    command = [
        sys.executable,
        "-m",
        "qrobust",
        "certify",
        str(checkpoint),
        *SETTINGS,
        "--output",
        str(output),
        "--resume",
    ]
    environment = os.environ | {"OMP_NUM_THREADS": "1"}
    rng = np.random.default_rng(0)
    kills = 0
    for _ in range(6):
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=environment)
        started = time.monotonic()
        # Wait until the run writes rows (past start-up), then kill it a random moment later.
        while process.poll() is None and (not output.exists() or len(output.read_bytes().splitlines()) < 2):
            time.sleep(0.02)
            assert time.monotonic() - started < 60
        time.sleep(rng.uniform(0.0, 0.5))
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            kills += 1
        process.wait()
    assert kills >= 5
    finished = subprocess.run(command, capture_output=True, text=True, env=environment, check=False)
    assert finished.returncode == 0, finished.stderr

    rows = read_certify_tsv(output)
    assert sorted(row.idx for row in rows) == sorted(set(row.idx for row in rows))  # each example once
    assert _columns(output) == _columns(reference)


def test_resume_drops_a_cut_off_row_and_finishes(run, checkpoint, tmp_path):
    output = tmp_path / "run.tsv"
    settings = ("--sigma", "0.25", "--n0", "20", "--n", "200", "--alpha", "0.01", "--num-examples", "6")
    assert run("certify", checkpoint, *settings, "--output", output)[0] == 0
    complete = output.read_text().splitlines()
    output.write_text("\n".join(complete[:3]) + "\n" + complete[3][:7])  # two rows, then a row cut mid-write
    code, out, _ = run("certify", checkpoint, *settings, "--output", output, "--resume")
    assert code == 0, out
    assert [line.split("\t")[:5] for line in output.read_text().splitlines()] == [
        line.split("\t")[:5] for line in complete
    ]
    assert output.read_text().splitlines()[:3] == complete[:3]  # kept rows untouched, timing included


def test_resume_refuses_other_settings_and_keeps_the_file(run, checkpoint, tmp_path):
    output = tmp_path / "run.tsv"
    settings = ("--sigma", "0.25", "--n0", "20", "--n", "200", "--alpha", "0.01", "--num-examples", "4")
    assert run("certify", checkpoint, *settings, "--output", output)[0] == 0
    before = output.read_bytes()
    code, _, err = run("certify", checkpoint, *settings[:-1], "5", "--output", output, "--resume")
    assert code == 2 and "indices" in err and "--overwrite" in err and err.count("\n") == 1
    assert output.read_bytes() == before
    code, _, err = run("certify", checkpoint, *settings, "--output", output)
    assert code == 2 and "--resume" in err


def test_adaptive_certify_records_its_radii(run, checkpoint, tmp_path):
    output = tmp_path / "adaptive.tsv"
    code, out, _ = run(
        "certify",
        checkpoint,
        "--sigma",
        "0.25",
        "--n0",
        "20",
        "--n",
        "4000",
        "--alpha",
        "0.01",
        "--num-examples",
        "5",
        "--adaptive",
        "--radii",
        "0,0.25",
        "--output",
        output,
    )
    assert code == 0, out
    assert output.read_text().splitlines()[0] == CERTIFY_SAMPLES_HEADER and len(read_certify_tsv(output)) == 5
    assert json.loads(output.with_suffix(".json").read_text())["settle_radii"] == [0.0, 0.25]


@pytest.mark.parametrize("command", ["certify", "predict"])
def test_resume_without_a_previous_run_starts_fresh(run, checkpoint, tmp_path, command):
    output = tmp_path / f"{command}.tsv"
    counts = ("--n0", "20") if command == "certify" else ()
    code, _, _ = run(
        command,
        checkpoint,
        "--sigma",
        "0.25",
        *counts,
        "--n",
        "100",
        "--alpha",
        "0.01",
        "--num-examples",
        "3",
        "--output",
        output,
        "--resume",
    )
    assert code == 0 and len(output.read_text().splitlines()) == 4


def test_resume_refuses_a_table_with_other_columns(run, checkpoint, tmp_path):
    output = tmp_path / "run.tsv"
    settings = ("--sigma", "0.25", "--n0", "20", "--n", "200", "--alpha", "0.01", "--num-examples", "6")
    assert run("certify", checkpoint, *settings, "--output", output)[0] == 0
    cohen = "\n".join("\t".join(line.split("\t")[:6]) for line in output.read_text().splitlines()[:3]) + "\n"
    output.write_text(cohen)  # Cohen et al.'s six columns: rows without samples cannot be continued
    code, _, err = run("certify", checkpoint, *settings, "--output", output, "--resume")
    assert code == 2 and "other columns" in err and len(err.strip().splitlines()) == 1
    assert output.read_text() == cohen
