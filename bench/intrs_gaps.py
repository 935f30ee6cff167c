"""IntRS-quant minus FloatRS-fp certified accuracy (points) at each radius, from results/intrs TSVs.

Usage: ``.venv/bin/python bench/intrs_gaps.py 0.12 0.25 0.5 1.0`` (after bench/intrs_table2.sh).
"""

from __future__ import annotations

import sys

from qrobust.smoothing import read_certify_tsv, summarize_rows

RADII = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)


def main(sigmas: list[str]) -> None:
    print("| sigma | " + " | ".join(f"r={r:g}" for r in RADII) + " | max abs gap |")
    print("|---" * (len(RADII) + 2) + "|")
    for sigma in sigmas:
        floating, integer = (
            summarize_rows(read_certify_tsv(f"results/intrs/certify-{method}-{sigma}.tsv"), RADII)
            for method in ("float-fp", "int")
        )
        gaps = [100 * (b - a) for a, b in zip(floating.certified_accuracy, integer.certified_accuracy, strict=True)]
        print(f"| {sigma} | " + " | ".join(f"{gap:+.1f}" for gap in gaps) + f" | {max(map(abs, gaps)):.1f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
