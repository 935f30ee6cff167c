"""The resumable, crash-safe runner of certify and predict jobs: rows stream to a TSV as they come.

``check_run`` checks the arguments and the output file; it and this module's imports are light, so the
command line calls it before torch loads. ``run_job`` imports the smoothing code when it runs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qrobust.errors import QRobustError
from qrobust.outputs import check_outputs, exclusive_lock, write_json_record, write_text_atomic

if TYPE_CHECKING:
    from qrobust.jobs import SmoothingJob

BACKENDS = ("local", "ray")


def check_run(output: Path, *, overwrite: bool, resume: bool, backend: str) -> None:
    """Raise QRobustError for an unknown backend or an output that cannot be (re)written."""
    if backend not in BACKENDS:
        raise QRobustError(f"backend must be local or ray, got {backend!r}")
    if output.suffix == ".json":
        raise QRobustError(f"--output {output} must not end in .json: the run config goes to OUTPUT with suffix .json")
    check_outputs([output], overwrite=overwrite or resume, resumable=True)


def run_job(
    job: SmoothingJob,
    output: Path,
    num_examples: int,
    *,
    overwrite: bool = False,
    resume: bool = False,
    backend: str = "local",
    workers: int = 2,
    address: str | None = None,
) -> int:
    """Run ``job`` on ``num_examples`` examples spread evenly over its split, rows appended to the TSV
    ``output`` (its run config to OUTPUT with suffix .json); returns the number classified correctly.

    Every argument and file is checked first; then, holding the output's lock, the missing examples run
    and their rows are appended: to the complete rows of the interrupted run that ``resume`` continues,
    or to a new TSV and run config written when the first row is ready (a run that fails before it
    leaves no file). ``backend`` "ray" shards the examples over ``workers`` Ray workers (at ``address``).
    """
    from qrobust.jobs import run_ray
    from qrobust.smoothing import CERTIFY_SAMPLES_HEADER, PREDICT_HEADER, read_certify_tsv, read_predict_tsv

    check_run(output, overwrite=overwrite, resume=resume, backend=backend)  # before any work; again under the lock
    with exclusive_lock(output):
        check_outputs([output], overwrite=overwrite or resume, resumable=True)
        smoothed, data, metadata = job.open()
        indices = example_indices(len(data), num_examples, job.split)
        run_config = {**asdict(job), "indices": indices, "model": metadata}
        header, reader = (
            (CERTIFY_SAMPLES_HEADER, read_certify_tsv)
            if job.command == "certify"
            else (PREDICT_HEADER, read_predict_tsv)
        )
        if resume and output.exists():
            done, start = _resumable_rows(output, run_config, header, reader), None
        else:
            _check_config_is_free(output, run_config, overwrite)
            done, start = [], (header, run_config)
        todo = indices[len(done) :]
        rows = job.rows(smoothed, data, todo) if backend == "local" else run_ray(job, todo, workers, address)
        return _write_rows(output, rows, done, len(indices), job.command, start)


def example_indices(size: int, num_examples: int, split: str) -> list[int]:
    """``num_examples`` indices spread evenly over a split of ``size`` examples."""
    from qrobust.smoothing import evenly_spaced

    if num_examples > size:
        raise QRobustError(f"--num-examples must be at most {size} (the {split} split's size), got {num_examples}")
    return evenly_spaced(size, num_examples)


def _config_changes(config_path: Path, run_config: dict[str, Any]) -> list[str] | None:
    """The settings of ``run_config`` that the run config saved in ``config_path`` differs in (None if
    that file is missing or not a run config)."""
    try:
        saved = json.loads(config_path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(saved, dict):
        return None
    current = json.loads(json.dumps(run_config))  # as it would read back from disk
    return [key for key in current if saved.get(key) != current[key]]


def _check_config_is_free(output: Path, run_config: dict[str, Any], overwrite: bool) -> None:
    """Refuse to replace an existing OUTPUT.json that is not this run's own config, unless ``overwrite``."""
    config_path = output.with_suffix(".json")
    if config_path.exists() and not overwrite and _config_changes(config_path, run_config) != []:
        raise QRobustError(
            f"{config_path} exists and is not this run's config, which would replace it; "
            "pass --overwrite to replace it, or choose another --output"
        )


def _resumable_rows(output: Path, run_config: dict[str, Any], header: str, reader) -> list:
    """The complete rows of the interrupted run in ``output``, after checking it had the same settings and
    the columns (``header``) this version writes."""
    config_path = output.with_suffix(".json")
    changed = _config_changes(config_path, run_config)
    if changed is None:
        raise QRobustError(f"cannot resume {output}: its run config {config_path} is missing or corrupt")
    if changed:
        raise QRobustError(
            f"cannot resume {output}: it was run with other {', '.join(changed)}; pass --overwrite to start again"
        )
    done = reader(output, interrupted=True)
    with output.open() as table:
        if table.readline().rstrip("\n") != header:
            raise QRobustError(
                f"cannot resume {output}: it has other columns than this qrobust writes; pass --overwrite"
            )
    if [row.idx for row in done] != run_config["indices"][: len(done)]:
        raise QRobustError(f"cannot resume {output}: its rows are not the run's first examples in order")
    complete = output.read_bytes().rfind(b"\n") + 1
    os.truncate(output, complete)  # drop a row cut off by the crash; complete rows stay byte for byte
    return done


def _write_rows(
    output: Path, rows: Iterator, done: list, total: int, task: str, start: tuple[str, dict[str, Any]] | None
) -> int:
    """Append rows to the TSV ``output`` as they come, with a progress bar; returns the number correct.

    ``start``: the header and run config of a new run, written (atomically) when the first row is ready.
    Each row goes out whole in one write, newline last, then is flushed: a run killed at any moment
    leaves complete rows and at most one cut-off last line, which ``resume`` drops.
    """
    from qrobust.progress import progress_bar

    correct = sum(row.correct for row in done)
    with progress_bar() as bar, ExitStack() as stack:
        progress = bar.add_task(task, total=total, completed=len(done), status="")
        table = None
        for count, row in enumerate(rows, start=len(done) + 1):
            if table is None:
                if start is not None:
                    write_json_record(output.with_suffix(".json"), start[1])
                    write_text_atomic(output, start[0] + "\n")
                table = stack.enter_context(output.open("a"))
            table.write(row.to_line() + "\n")
            table.flush()
            correct += row.correct
            bar.update(progress, advance=1, status=f"correct {correct}/{count}")
    return correct
