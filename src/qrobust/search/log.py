"""The search log: one JSON line per finished episode, appended as it ends, so a search can resume.

The first line is a header (``{"header": {...}}``: the search config and the model it searched); every
other line is an ``EpisodeRecord``. Each line is flushed and fsynced when written. A line cut short by a
crash is dropped (and cut from the file) when the log is opened again, so a resumed search starts after
the last complete episode.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from qrobust.errors import QRobustError
from qrobust.quant.bitops import BitPolicy


@dataclass(frozen=True)
class EpisodeRecord:
    """One finished episode of the search.

    ``actions`` are the agent's actions in [0, 1] in step order (weights then activations of each
    searched layer), before the budget lowered any bits; ``policy`` is the policy that was fine-tuned
    and scored, within budget. ``acr`` (the quantized smoothed model's average certified radius, l2 in
    [0, 1] pixel units) is None when the reward did not certify; ``accuracy`` is the quantized base
    model's accuracy on one Gaussian draw per validation image.
    """

    episode: int
    actions: tuple[float, ...]
    policy: BitPolicy
    bitops_percent: float
    reward: float
    acr: float | None
    accuracy: float
    seconds: float

    def to_json(self) -> str:
        fields = asdict(self) | {"actions": list(self.actions), "policy": self.policy.to_dict()}
        return json.dumps(fields)

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> EpisodeRecord:
        return cls(
            episode=int(fields["episode"]),
            actions=tuple(float(a) for a in fields["actions"]),
            policy=BitPolicy.from_dict(fields["policy"]),
            bitops_percent=float(fields["bitops_percent"]),
            reward=float(fields["reward"]),
            acr=None if fields["acr"] is None else float(fields["acr"]),
            accuracy=float(fields["accuracy"]),
            seconds=float(fields["seconds"]),
        )


def best_record(records: list[EpisodeRecord]) -> EpisodeRecord | None:
    """The episode with the highest reward (the earliest among ties), or None for no episodes.

    Algorithm 1 starts Reward_best at 0, which an ACR difference (mostly negative) may never beat;
    starting at -inf keeps the best policy found.
    """
    best: EpisodeRecord | None = None
    for record in records:
        if best is None or record.reward > best.reward:
            best = record
    return best


class SearchLog:
    """An append-only JSON-lines log of a search; ``open`` reads what an earlier run left."""

    def __init__(self, path: Path, header: dict[str, Any]):
        self.path, self.header = path, header

    @classmethod
    def open(
        cls, path: str | Path, header: dict[str, Any], *, ignore: tuple[str, ...] = ()
    ) -> tuple[SearchLog, list[EpisodeRecord]]:
        """The log at ``path`` and its complete episodes; a new log (header only) if there is none.

        An existing log must have been written with the same ``header`` but for the keys in ``ignore``
        (e.g. the number of episodes, which a resumed run may raise); otherwise QRobustError says
        which entries differ. Its episodes must be numbered 0, 1, 2, ...
        """
        path = Path(path)
        header = json.loads(json.dumps(header))  # the JSON view (tuples as lists), as it is compared
        if not path.exists() or path.stat().st_size == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("w") as file:
                _write_line(file, json.dumps({"header": header}))
            return cls(path, header), []
        text = path.read_text()
        complete = text[: text.rfind("\n") + 1]  # a crash can leave a last line without its newline
        lines = complete.splitlines()
        try:
            saved = json.loads(lines[0])["header"] if lines else None
            records = [EpisodeRecord.from_dict(json.loads(line)) for line in lines[1:]]
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            raise QRobustError(f"{path} is not a qrobust search log: {error}") from None
        if not isinstance(saved, dict):
            raise QRobustError(f"{path} is not a qrobust search log: its first line has no header")
        differences = sorted(
            key for key in set(saved) | set(header) if key not in ignore and saved.get(key) != header.get(key)
        )
        if differences:
            raise QRobustError(
                f"{path} was written by a search with different {', '.join(differences)}; "
                "use another output directory or delete the log to start over"
            )
        if [record.episode for record in records] != list(range(len(records))):
            raise QRobustError(f"{path} has episodes out of order; delete it to start over")
        if len(complete) != len(text):
            with path.open("r+") as file:
                file.truncate(len(complete.encode()))
        return cls(path, header), records

    def append(self, record: EpisodeRecord) -> None:
        """Write ``record`` as one line and flush it to disk."""
        if not all(math.isfinite(value) for value in (record.reward, record.bitops_percent, record.accuracy)):
            raise ValueError(f"episode {record.episode} has a non-finite reward, BitOPs or accuracy")
        with self.path.open("a") as file:
            _write_line(file, record.to_json())


def _write_line(file, line: str) -> None:
    file.write(line + "\n")
    file.flush()
    os.fsync(file.fileno())
