"""Experiment reports: every certification run found is compared in tables and plots."""

import json

import pytest

from qrobust.errors import QRobustError
from qrobust.report import write_report
from qrobust.smoothing import CERTIFY_HEADER, PREDICT_HEADER, CertifyRow


def _write_run(path, method, sigma, rows):
    path.write_text("\n".join([CERTIFY_HEADER, *(row.to_line() for row in rows)]) + "\n")
    config = {
        "method": method,
        "sigma": sigma,
        "n": 1000,
        "n0": 100,
        "alpha": 0.001,
        "model": {"dataset": {"name": "digits"}},
    }
    path.with_suffix(".json").write_text(json.dumps(config))


def test_report_compares_runs_of_one_sigma(tmp_path):
    results = tmp_path / "results"
    (results / "sub").mkdir(parents=True)
    # fp: radii 0.5 and 0.3 correct, one wrong; int: one correct at 0.2, one abstained, one wrong.
    _write_run(
        results / "fp.tsv",
        "float-fp",
        0.25,
        [CertifyRow(0, 1, 1, 0.5, 2.0), CertifyRow(1, 2, 2, 0.3, 2.0), CertifyRow(2, 3, 4, 0.1, 2.0)],
    )
    _write_run(
        results / "int.tsv",
        "int",
        0.25,
        [CertifyRow(0, 1, 1, 0.2, 0.5), CertifyRow(1, 2, -1, 0.0, 0.5), CertifyRow(2, 3, 4, 0.1, 0.5)],
    )
    _write_run(results / "sub" / "other.tsv", "float-fp", 0.5, [CertifyRow(0, 1, 1, 0.9, 1.0)])
    (results / "predict.tsv").write_text(PREDICT_HEADER + "\n0\t1\t1\t1\t0:00:01\n")  # not a certify run: skipped

    page = write_report([results], tmp_path / "report", radii=(0.0, 0.25))
    text = page.read_text()
    assert text.count("## ") == 2 and "sigma = 0.25" in text and "sigma = 0.5" in text
    assert "| FloatRS-fp | 3 | 66.7 | 66.7 | 0.267 | 100.0 | 2.000 | 1.00x |" in text
    assert "| IntRS-quant | 3 | 33.3 | 0.0 | 0.067 | 66.7 | 0.500 | 4.00x |" in text
    assert "| IntRS-quant | 3 | 50.0 | 0.0 |" in text  # eq. 10: over the 2 examples not abstained
    assert sorted(p.name for p in page.parent.glob("*.png")) == ["group-1.png", "group-2.png"]


def test_report_without_runs_is_an_error(tmp_path):
    with pytest.raises(QRobustError, match="no certification TSVs"):
        write_report([tmp_path], tmp_path / "report")
    with pytest.raises(QRobustError, match="not a directory"):
        write_report([tmp_path / "absent"], tmp_path / "report")


def test_report_refuses_to_replace_an_earlier_one_unless_told(tmp_path):
    (tmp_path / "results").mkdir()
    _write_run(tmp_path / "results" / "fp.tsv", "float-fp", 0.25, [CertifyRow(0, 1, 1, 0.5, 2.0)])
    report = tmp_path / "report"
    write_report([tmp_path / "results"], report)
    before = {path.name: path.read_bytes() for path in report.iterdir()}
    with pytest.raises(QRobustError, match=r"README\.md exists; pass --overwrite"):
        write_report([tmp_path / "results"], report)
    assert {path.name: path.read_bytes() for path in report.iterdir()} == before
    write_report([tmp_path / "results"], report, overwrite=True)
    assert sorted(path.name for path in report.iterdir()) == ["README.md", "group-1.png"]
