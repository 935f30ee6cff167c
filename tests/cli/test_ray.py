"""The Ray backend: the same rows as a local run, streamed in index order."""

import pytest

ray = pytest.importorskip("ray")

SETTINGS = ("--sigma", "0.25", "--n0", "20", "--n", "500", "--alpha", "0.01", "--num-examples", "9")


def test_ray_finishes_a_local_run_with_the_same_rows(run, checkpoint, tmp_path):
    """Ray workers give the rows a local run gives, and the backend is not part of a run's settings: a
    local run killed after two examples is finished on Ray."""
    reference, output = tmp_path / "reference.tsv", tmp_path / "resumed.tsv"
    assert run("certify", checkpoint, *SETTINGS, "--output", reference)[0] == 0
    lines = reference.read_text().splitlines(keepends=True)
    output.write_text("".join(lines[:3]))
    output.with_suffix(".json").write_text(reference.with_suffix(".json").read_text())
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        code, out, _ = run(
            "certify", checkpoint, *SETTINGS, "--output", output, "--resume", "--backend", "ray", "--workers", 2
        )
    finally:
        ray.shutdown()
    assert code == 0, out
    assert [line.split("\t")[:5] for line in output.read_text().splitlines()] == [
        line.split("\t")[:5] for line in lines
    ]
    assert output.read_text().splitlines(keepends=True)[:3] == lines[:3]
