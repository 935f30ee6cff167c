"""Correct, abstain and wrong rates of prediction TSVs (IntRS supplement, Table 1 and Fig. 11), as Markdown.

Usage: ``.venv/bin/python bench/summarize_predictions.py runs/*.tsv`` (each TSV's .json gives n and alpha).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from qrobust.smoothing import ABSTAIN, read_predict_tsv


def main(paths: list[str]) -> None:
    print("| run | method | sigma | n | alpha | images | correct % | abstain % | wrong % | s/image |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for path in map(Path, paths):
        rows = read_predict_tsv(path)
        config = json.loads(path.with_suffix(".json").read_text())
        total = len(rows)
        correct = sum(row.correct for row in rows)
        abstain = sum(row.predict == ABSTAIN for row in rows)
        seconds = sum(row.seconds for row in rows) / total
        print(
            f"| {path.stem} | {config['method']} | {config['sigma']} | {config['n']} | {config['alpha']} | {total} | "
            f"{100 * correct / total:.1f} | {100 * abstain / total:.1f} | {100 * (total - correct - abstain) / total:.1f} | {seconds:.3f} |"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
