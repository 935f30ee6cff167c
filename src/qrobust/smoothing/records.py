"""The per-example TSVs of certify and predict runs, in the format of Cohen et al.'s reference code.

Certify columns: ``idx label predict radius correct time``; predict columns: ``idx label predict correct
time``. ``predict`` is -1 when the test abstained, ``correct`` is 0/1, ``time`` is the wall time of the
example as ``H:MM:SS.ffffff``.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qrobust.errors import QRobustError
from qrobust.smoothing.metrics import DEFAULT_RADII, CertifiedSummary, summarize

CERTIFY_HEADER = "idx\tlabel\tpredict\tradius\tcorrect\ttime"
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

    @property
    def correct(self) -> bool:
        return self.predict == self.label

    def to_line(self) -> str:
        elapsed = datetime.timedelta(seconds=self.seconds)
        return f"{self.idx}\t{self.label}\t{self.predict}\t{self.radius:.6f}\t{int(self.correct)}\t{elapsed}"


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
        return f"{self.idx}\t{self.label}\t{self.predict}\t{int(self.correct)}\t{datetime.timedelta(seconds=self.seconds)}"


def read_certify_tsv(path: str | Path) -> list[CertifyRow]:
    """Rows of a certification TSV; a malformed file raises QRobustError naming the line."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as error:
        raise QRobustError(f"cannot read certification results {path}: {error.strerror or error}") from None
    if not lines or lines[0].strip() != CERTIFY_HEADER:
        raise QRobustError(f"{path} is not a certification TSV: the first line must be '{CERTIFY_HEADER.expandtabs(1)}'")
    rows = []
    for number, line in enumerate(lines[1:], start=2):
        fields = line.split("\t")
        try:
            if len(fields) != 6:
                raise ValueError(f"expected 6 tab-separated fields, got {len(fields)}")
            rows.append(
                CertifyRow(int(fields[0]), int(fields[1]), int(fields[2]), float(fields[3]), _parse_seconds(fields[5]))
            )
        except ValueError as error:
            raise QRobustError(f"{path}, line {number}: {error}") from None
    if not rows:
        raise QRobustError(f"{path} holds no examples")
    return rows


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
