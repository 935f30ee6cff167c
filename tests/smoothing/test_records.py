import json

import pytest

from qrobust.errors import QRobustError
from qrobust.smoothing import (
    ABSTAIN,
    CERTIFY_HEADER,
    CERTIFY_SAMPLES_HEADER,
    PREDICT_HEADER,
    CertifyRow,
    PredictRow,
    read_certify_tsv,
    read_predict_tsv,
    summarize_rows,
)


def test_rows_round_trip_through_the_cohen_tsv(tmp_path):
    rows = [
        CertifyRow(0, 3, 3, 0.512345, 1.5),
        CertifyRow(20, 1, ABSTAIN, 0.0, 3725.25),
        CertifyRow(40, 2, 5, 0.1, 0.01),
    ]
    path = tmp_path / "run.tsv"
    path.write_text("\n".join([CERTIFY_HEADER, *(row.to_line() for row in rows)]) + "\n")
    assert path.read_text().splitlines()[2] == "20\t1\t-1\t0.000000\t0\t1:02:05.250000"
    back = read_certify_tsv(path)
    assert [(r.idx, r.label, r.predict, r.correct) for r in back] == [
        (0, 3, 3, True),
        (20, 1, -1, False),
        (40, 2, 5, False),
    ]
    assert back[0].radius == pytest.approx(0.512345) and back[1].seconds == pytest.approx(3725.25)
    summary = summarize_rows(back, radii=(0.0, 0.5))
    assert summary.certified_accuracy == pytest.approx((1 / 3, 1 / 3))
    assert summary.certified_percentage == pytest.approx(2 / 3)


def test_rows_record_the_samples_each_example_used(tmp_path):
    rows = [CertifyRow(0, 3, 3, 0.5, 1.5, samples=2_000), CertifyRow(7, 1, ABSTAIN, 0.0, 0.5, samples=100_000)]
    path = tmp_path / "run.tsv"
    path.write_text("\n".join([CERTIFY_SAMPLES_HEADER, *(row.to_line() for row in rows)]) + "\n")
    assert path.read_text().splitlines()[1] == "0\t3\t3\t0.500000\t1\t0:00:01.500000\t2000"
    assert [row.samples for row in read_certify_tsv(path)] == [2_000, 100_000]
    path.write_text(f"{CERTIFY_HEADER}\n0\t3\t3\t0.5\t1\t0:00:01\n")  # Cohen's columns: samples unknown
    assert read_certify_tsv(path)[0].samples is None
    path.write_text(f"{CERTIFY_SAMPLES_HEADER}\n0\t3\t3\t0.5\t1\t0:00:01\t0\n")
    with pytest.raises(QRobustError, match="line 2: samples must be >= 1, got 0"):
        read_certify_tsv(path)
    path.write_text(f"{CERTIFY_SAMPLES_HEADER}\n0\t3\t3\t0.5\t1\t0:00:01\n")
    with pytest.raises(QRobustError, match="line 2: expected 7 tab-separated fields, got 6"):
        read_certify_tsv(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "not a certification TSV"),
        ("idx\tlabel\n", "not a certification TSV"),
        (CERTIFY_HEADER + "\n", "no examples"),
        (CERTIFY_HEADER + "\n0\t1\t1\t0.5\t1\n", "line 2: expected 6"),
        (CERTIFY_HEADER + "\n0\t1\tx\t0.5\t1\t0:00:01\n", "line 2"),
    ],
)
def test_malformed_files_name_the_problem(tmp_path, text, message):
    path = tmp_path / "bad.tsv"
    path.write_text(text)
    with pytest.raises(QRobustError, match=message):
        read_certify_tsv(path)


GOOD_ROW = "0\t1\t1\t0.5\t1\t0:00:01"


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("5\t1\t1\tnan\t1\t0:00:01", "radius must be finite and >= 0, got nan"),
        ("5\t1\t1\tinf\t1\t0:00:01", "radius must be finite"),
        ("5\t1\t1\t-0.5\t1\t0:00:01", "radius must be finite and >= 0, got -0.5"),
        ("5\t1\t-1\t0.5\t0\t0:00:01", "an abstained example has radius 0"),
        ("5\t-1\t-1\t0.0\t1\t0:00:01", "label must be >= 0"),
        ("5\t1\t-2\t0.0\t0\t0:00:01", "predict must be a class >= 0 or -1"),
        ("5\t1\t2\t0.5\t1\t0:00:01", "correct must be 0 for label 1 and predict 2"),
        ("-5\t1\t1\t0.5\t1\t0:00:01", "idx must be >= 0"),
        ("0\t2\t2\t0.5\t1\t0:00:01", "example 0 is already on line 2"),
    ],
)
def test_values_no_run_writes_are_refused_with_their_line(tmp_path, row, message):
    path = _write(tmp_path / "bad.tsv", f"{CERTIFY_HEADER}\n{GOOD_ROW}\n{row}\n")
    with pytest.raises(QRobustError, match=rf"bad.tsv, line 3: {message}"):
        read_certify_tsv(path)


def test_classes_are_checked_against_the_run_config(tmp_path):
    path = _write(tmp_path / "run.tsv", f"{CERTIFY_HEADER}\n{GOOD_ROW}\n7\t3\t3\t0.5\t1\t0:00:01\n")
    assert len(read_certify_tsv(path)) == 2  # no run config: any class
    with pytest.raises(QRobustError, match=r"line 3: label must be >= 0 and < 3"):
        read_certify_tsv(path, num_classes=3)
    path.with_suffix(".json").write_text(json.dumps({"model": {"dataset": {"classes": ["a", "b", "c"]}}}))
    with pytest.raises(QRobustError, match=r"line 3: label must be >= 0 and < 3"):
        read_certify_tsv(path)
    predictions = _write(tmp_path / "run-predict.tsv", f"{PREDICT_HEADER}\n0\t1\t4\t0\t0:00:01\n")
    with pytest.raises(QRobustError, match=r"line 2: predict must be a class >= 0 and < 3"):
        read_predict_tsv(predictions, num_classes=3)


def test_missing_file(tmp_path):
    with pytest.raises(QRobustError, match="cannot read"):
        read_certify_tsv(tmp_path / "absent.tsv")


def test_prediction_rows_round_trip(tmp_path):
    rows = [PredictRow(3, 1, 1, 0.25), PredictRow(7, 2, ABSTAIN, 1.0)]
    path = tmp_path / "predict.tsv"
    path.write_text("\n".join([PREDICT_HEADER, *(row.to_line() for row in rows)]) + "\n")
    back = read_predict_tsv(path)
    assert [(r.idx, r.label, r.predict, r.correct, r.seconds) for r in back] == [
        (3, 1, 1, True, 0.25),
        (7, 2, -1, False, 1.0),
    ]
    with pytest.raises(QRobustError, match="not a prediction TSV"):
        read_predict_tsv(_write(tmp_path / "bad.tsv", CERTIFY_HEADER + "\n"))


def _write(path, text):
    path.write_text(text)
    return path
