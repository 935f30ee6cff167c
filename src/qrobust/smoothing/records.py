"""The per-example TSVs of certify and predict runs, in the format of Cohen et al.'s reference code.

Certify columns: ``idx label predict radius correct time samples`` (``CERTIFY_SAMPLES_HEADER``; Cohen's
files, without ``samples``, read too); predict columns: ``idx label predict correct time``. ``predict`` is
-1 when the test abstained, ``correct`` is 0/1, ``time`` is the wall time of the example as
``H:MM:SS.ffffff``, ``samples`` the estimation samples its certificate used (n, or fewer when adaptive
certification stopped early; ``Certificate.samples``).

Reading checks every row's values, naming the line of the first bad one: indices unique and >= 0,
labels >= 0, predictions >= -1, both below the number of classes where it is known (the run config
next to the TSV, OUTPUT with suffix .json, names the dataset), ``correct`` equal to label == predict,
radii finite and >= 0 and 0 where the test abstained, times finite and >= 0.
"""

from __future__ import annotations

import datetime
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qrobust.errors import QRobustError
from qrobust.smoothing.metrics import DEFAULT_RADII, CertifiedSummary, summarize

CERTIFY_HEADER = "idx\tlabel\tpredict\tradius\tcorrect\ttime"  # Cohen et al.'s columns
CERTIFY_SAMPLES_HEADER = CERTIFY_HEADER + "\tsamples"  # what qrobust writes
PREDICT_HEADER = "idx\tlabel\tpredict\tcorrect\ttime"
ABSTAIN = -1


@dataclass(frozen=True)
class CertifyRow:
    """One example of a certification run."""

    idx: int
    label: int
    predict: int  # ABSTAIN (-1) when the certificate abstained
    radius: float
    seconds: float
    samples: int | None = None  # estimation samples used; None in Cohen's format

    @property
    def correct(self) -> bool:
        return self.predict == self.label

    def to_line(self) -> str:
        """The row as a TSV line: Cohen's six columns, and ``samples`` when it is known."""
        elapsed = datetime.timedelta(seconds=self.seconds)
        line = f"{self.idx}\t{self.label}\t{self.predict}\t{self.radius:.6f}\t{int(self.correct)}\t{elapsed}"
        return line if self.samples is None else f"{line}\t{self.samples}"


@dataclass(frozen=True)
class PredictRow:
    """One example of a prediction run."""

    idx: int
    label: int
    predict: int  # ABSTAIN (-1) when the test abstained
    seconds: float

    @property
    def correct(self) -> bool:
        return self.predict == self.label

    def to_line(self) -> str:
        return (
            f"{self.idx}\t{self.label}\t{self.predict}\t{int(self.correct)}\t{datetime.timedelta(seconds=self.seconds)}"
        )


def read_certify_tsv(
    path: str | Path, *, interrupted: bool = False, num_classes: int | None = None
) -> list[CertifyRow]:
    """Rows of a certification TSV; a malformed file or a bad value raises QRobustError naming the line.

    ``num_classes``: the classes labels and predictions must be below (default: from the run config
    next to the TSV, unchecked without one). ``interrupted``: the run may have been killed while writing, so a last line without its newline
    (cut off mid-write) is left out and a table with no rows yet is allowed.
    """
    return _read_rows(
        path, "certification", (CERTIFY_SAMPLES_HEADER, CERTIFY_HEADER), _certify_row, interrupted, num_classes
    )


def _certify_row(fields: list[str]) -> CertifyRow:
    samples = int(fields[6]) if len(fields) > 6 else None
    if samples is not None and samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    return CertifyRow(
        int(fields[0]), int(fields[1]), int(fields[2]), float(fields[3]), _parse_seconds(fields[5]), samples
    )


def read_predict_tsv(
    path: str | Path, *, interrupted: bool = False, num_classes: int | None = None
) -> list[PredictRow]:
    """Rows of a prediction TSV; a malformed file or a bad value raises QRobustError naming the line
    (``interrupted``, ``num_classes``: as for ``read_certify_tsv``)."""
    return _read_rows(
        path,
        "prediction",
        (PREDICT_HEADER,),
        lambda f: PredictRow(int(f[0]), int(f[1]), int(f[2]), _parse_seconds(f[4])),
        interrupted,
        num_classes,
    )


def _read_rows(
    path: str | Path,
    kind: str,
    headers: tuple[str, ...],
    parse: Callable[[list[str]], Any],
    interrupted: bool,
    num_classes: int | None,
) -> list:
    """The rows under the first line, which must be one of ``headers`` (the first is the one named in errors)."""
    path = Path(path)
    if num_classes is None:
        num_classes = _run_classes(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise QRobustError(f"cannot read {kind} results {path}: {error.strerror or error}") from None
    if interrupted and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]  # rows are written whole, newline last: drop a cut-off one
    lines = text.splitlines()
    if not lines or lines[0].strip() not in headers:
        raise QRobustError(f"{path} is not a {kind} TSV: the first line must be '{headers[0].expandtabs(1)}'")
    columns = lines[0].strip().split("\t")
    width, correct = len(columns), columns.index("correct")
    rows, lines_of = [], dict[int, int]()
    for number, line in enumerate(lines[1:], start=2):
        fields = line.split("\t")
        try:
            if len(fields) != width:
                raise ValueError(f"expected {width} tab-separated fields, got {len(fields)}")
            row = parse(fields)
            _check_row(row, fields[correct], num_classes)
            if row.idx in lines_of:
                raise ValueError(f"example {row.idx} is already on line {lines_of[row.idx]}")
            lines_of[row.idx] = number
            rows.append(row)
        except ValueError as error:
            raise QRobustError(f"{path}, line {number}: {error}") from None
    if not rows and not interrupted:
        raise QRobustError(f"{path} holds no examples")
    return rows


def _check_row(row: CertifyRow | PredictRow, correct: str, num_classes: int | None) -> None:
    """Raise ValueError if ``row`` (with its ``correct`` field) holds a value no run writes."""
    classes = "" if num_classes is None else f" and < {num_classes} (the dataset's classes)"
    if row.idx < 0:
        raise ValueError(f"idx must be >= 0, got {row.idx}")
    if not 0 <= row.label < (num_classes or math.inf):
        raise ValueError(f"label must be >= 0{classes}, got {row.label}")
    if not ABSTAIN <= row.predict < (num_classes or math.inf):
        raise ValueError(f"predict must be a class >= 0{classes} or {ABSTAIN} (abstained), got {row.predict}")
    if correct != str(int(row.correct)):
        raise ValueError(
            f"correct must be {int(row.correct)} for label {row.label} and predict {row.predict}, got {correct!r}"
        )
    if not (math.isfinite(row.seconds) and row.seconds >= 0):
        raise ValueError(f"time must be finite and >= 0, got {row.seconds}")
    if isinstance(row, CertifyRow) and not (math.isfinite(row.radius) and row.radius >= 0):
        raise ValueError(f"radius must be finite and >= 0, got {row.radius}")
    if isinstance(row, CertifyRow) and row.predict == ABSTAIN and row.radius != 0:
        raise ValueError(f"an abstained example has radius 0, got {row.radius}")


def _run_classes(path: Path) -> int | None:
    """The number of classes of the dataset named by the run config next to ``path``, if there is one."""
    try:
        return len(json.loads(path.with_suffix(".json").read_text())["model"]["dataset"]["classes"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def summarize_rows(rows: list[CertifyRow], radii=DEFAULT_RADII) -> CertifiedSummary:
    """Certified accuracy, certified percentage and ACR of a run."""
    return summarize(
        np.array([row.radius for row in rows]),
        np.array([row.correct for row in rows]),
        np.array([row.predict == ABSTAIN for row in rows]),
        radii,
    )


def _parse_seconds(text: str) -> float:
    """Seconds from ``H:MM:SS[.ffffff]`` (Cohen's format, via str(timedelta)) or a plain number."""
    if ":" not in text:
        return float(text)
    hours, minutes, seconds = text.split(":")
    return int(hours) * 3600 + int(minutes) * 60 + float(seconds)
