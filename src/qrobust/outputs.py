"""Output files written safely: checked before any work, written atomically, one writer at a time.

A command calls ``check_outputs`` (or ``check_writable``) before it loads or computes anything, writes
each file with ``atomic_path`` or ``write_text_atomic`` (a temporary file renamed over the target and
removed if anything fails, so no ``.tmp`` file is left behind), and holds ``exclusive_lock`` while it
appends to a file another run could also write.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from qrobust.errors import QRobustError


def check_outputs(paths: Iterable[Path], *, overwrite: bool, resumable: bool = False, option: str = "--output") -> None:
    """Raise QRobustError unless every path can be written: not a directory, absent (or ``overwrite``),
    and in a directory that exists or can be made, where files can be created. ``resumable``: the
    refusal of an existing file also offers --resume."""
    for path in paths:
        if path.is_dir():
            raise QRobustError(f"{option} {path} is a directory; give the name of a file to write")
        if path.exists() and not overwrite:
            resume = "--resume to continue it or " if resumable else ""
            raise QRobustError(f"{path} exists; pass {resume}--overwrite to replace it, or choose another {option}")
        check_writable(path.parent)


def check_writable(directory: Path) -> None:
    """Raise QRobustError unless files can be created in ``directory`` (or in the directories it needs)."""
    existing = directory.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise QRobustError(f"cannot write into {directory}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise QRobustError(f"cannot write into {directory}: {existing} is not writable")


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path next to ``path`` to write; it replaces ``path`` when the block ends and is
    removed if the block raises, so ``path`` is the old file or the whole new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # the pid keeps concurrent writers apart
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (see ``atomic_path``)."""
    with atomic_path(path) as temporary:
        temporary.write_text(text)


@contextmanager
def exclusive_lock(path: Path, option: str = "--output") -> Iterator[None]:
    """Hold the OS advisory lock (flock) of ``path`` for the block, or raise QRobustError naming the run
    that holds it. The lock is on ``path`` + ".lock", not on ``path``, which atomic writes replace; the
    lock file names its holder and is removed when the block ends (a killed run's stale one is harmless)."""
    lock_path = path.with_name(path.name + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        handle = lock_path.open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise QRobustError(
                f"{path} is being written by another run ({holder}); wait for it to end or choose another {option}"
            ) from None
        if lock_path.exists() and os.stat(lock_path).st_ino == os.fstat(handle.fileno()).st_ino:
            break
        handle.close()  # its holder removed the file between our open and flock: lock the new one
    try:
        handle.truncate(0)
        handle.write(f"process {os.getpid()}: qrobust {' '.join(sys.argv[1:2])}\n")
        handle.flush()
        yield
    finally:
        lock_path.unlink(missing_ok=True)  # while still holding it, so no one locks a removed file
        handle.close()


def write_json_record(path: Path, record: dict[str, Any]) -> None:
    """``record`` with the time and the command line, as indented JSON, written atomically: the config
    of a run, next to its results, so the run can be reproduced."""
    record = record | {"started": datetime.now(UTC).isoformat(timespec="seconds"), "argv": sys.argv}
    write_text_atomic(path, json.dumps(record, indent=2) + "\n")
