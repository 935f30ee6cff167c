"""certify's sequential and randomized options, the unreachable-radius warning, lattice smoothing, and plan."""

import json

import pytest

from qrobust.smoothing import FloatRS, read_certify_tsv
from qrobust.smoothing.methods import radius_map_for
from qrobust.smoothing.planner import fixed_n_any, sequential_n_any

SETTINGS = ("--sigma", "0.25", "--n0", "20", "--alpha", "0.01", "--num-examples", "4")


def test_small_n_warns_of_radii_no_input_can_certify(run, checkpoint, tmp_path):
    code, _, err = run("certify", checkpoint, *SETTINGS, "--n", 200, "--output", tmp_path / "run.tsv")
    assert code == 0
    warning = [line for line in err.splitlines() if line.startswith("warning: no input can certify")]
    assert len(warning) == 1 and "radius 0.5, 0.75, 1 with n = 200" in warning[0]


def test_enough_samples_give_no_warning(run, checkpoint, tmp_path):
    settings = ("--sigma", "0.5", "--n0", "20", "--alpha", "0.01", "--num-examples", "2", "--n", "2000")
    code, _, err = run("certify", checkpoint, *settings, "--output", tmp_path / "run.tsv")
    assert code == 0 and "no input can certify" not in err  # 2,000 votes of 2,000 certify 1.0 at sigma 0.5


@pytest.mark.parametrize("sequential", ["cs", "union"])
def test_adaptive_runs_record_their_test_and_samples(run, checkpoint, tmp_path, sequential):
    output = tmp_path / "run.tsv"
    code, _, err = run(
        "certify",
        checkpoint,
        *SETTINGS,
        "--n",
        5_000,
        "--adaptive",
        "--radii",
        "0,0.25",
        "--sequential",
        sequential,
        "--output",
        output,
    )
    assert code == 0, err
    assert json.loads(output.with_suffix(".json").read_text())["sequential"] == sequential
    assert all(1 <= row.samples <= 5_000 for row in read_certify_tsv(output))


def test_randomized_bound_is_recorded_and_reproducible(run, checkpoint, tmp_path):
    first, second = tmp_path / "a.tsv", tmp_path / "b.tsv"
    for output in (first, second):
        assert run("certify", checkpoint, *SETTINGS, "--n", 500, "--randomized-bound", "--output", output)[0] == 0
    assert json.loads(first.with_suffix(".json").read_text())["randomized_bound"] is True
    assert [r.radius for r in read_certify_tsv(first)] == [r.radius for r in read_certify_tsv(second)]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--sequential", "peek"), "--sequential must be cs or union"),
        (("--randomized-bound", "--adaptive"), "--randomized-bound applies to fixed-n"),
        (("--method", "gauss"), "--method must be one of"),
    ],
)
def test_bad_options_are_one_line_and_write_nothing(run, checkpoint, tmp_path, extra, message):
    output = tmp_path / "run.tsv"
    code, _, err = run("certify", checkpoint, *SETTINGS, "--n", 200, *extra, "--output", output)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_lattice_smoothing_of_a_float_checkpoint(run, checkpoint, tmp_path):
    output = tmp_path / "run.tsv"
    code, _, err = run("certify", checkpoint, *SETTINGS, "--n", 500, "--method", "lattice", "--output", output)
    assert code == 0, err
    assert len(read_certify_tsv(output)) == 4


def test_the_light_method_list_is_the_library_s():
    from qrobust.cli.smoothing_options import SMOOTHING_METHODS
    from qrobust.jobs import METHODS

    assert SMOOTHING_METHODS == tuple(METHODS)


def test_plan_prints_the_planner_numbers(run):
    code, out, err = run("plan", "--sigma", 0.25, "--radius", 0.5, "--alpha", 0.001, "--p-a", 0.99)
    assert code == 0, err
    radius_map = radius_map_for(FloatRS(0.25))
    assert f"{fixed_n_any(radius_map, 0.5, 0.001):,}" in out and f"{sequential_n_any(radius_map, 0.5, 0.001):,}" in out
    code, _, err = run("plan", "--sigma", 0.25, "--radius", -1)
    assert code == 2 and "--radius must be > 0" in err
