"""One writer per run directory (and per export directory): an OS-level lock held for a stage's life.

    with writer_lock("runs/x"):            # NestlingError naming the holder when another process has it
        run_traces(cfg)
    with writer_lock("runs/x", wait=True): # or wait for the holder to finish
        ...

The lock is ``flock`` on ``RUN/.nestling.lock`` through ``filelock``: the kernel drops it when the holder
exits, however it exits (kill -9 included), so there is no stale PID file to clean up. After acquiring, the
holder writes its PID and command line into the lock file, which is what a refused writer reports; filelock
opens a contended lock file without truncating it, so a refused writer leaves that record intact.

An export into ``RUN/exports/NAME`` takes RUN's lock (it writes inside that run directory); an export
elsewhere takes ``.NAME.nestling.lock`` beside it (inside, the lock would block the export's final rename).
Nested stages in one process (run -> traces -> train) share the lock taken at the top. Under torchrun /
accelerate launch the ranks of one job share rank 0's lock: only rank 0 writes, and a second job's rank 0
is refused, which ends that job. Readers (ask, serve, eval of a finished run) never take it.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from nestling.core.errors import NestlingError

log = logging.getLogger(__name__)

LOCK_NAME = ".nestling.lock"

# Locks this process holds, by lock file: a nested stage finds its directory already locked by its caller.
_HELD: dict[Path, FileLock] = {}


def lock_file(directory: str | Path, export: bool = False) -> Path:
    """The lock file guarding writes to `directory`: inside a run directory; for an export directory, its
    run directory's when it is RUN/exports/NAME, else one beside it."""
    d = Path(directory)
    if not export:
        return d / LOCK_NAME
    if d.parent.name == "exports":
        return d.parent.parent / LOCK_NAME
    return d.with_name(f".{d.name}{LOCK_NAME}")


def _holder_record() -> dict:
    program = Path(sys.argv[0])
    name = program.parent.name if program.name == "__main__.py" else program.name  # python -m nestling
    record = {"pid": os.getpid(), "command": shlex.join([name, *sys.argv[1:]])}
    job = os.environ.get("TORCHELASTIC_RUN_ID")
    if job:
        record["job"] = job
    return record


def read_holder(path: Path) -> dict | None:
    """The holder's record from a lock file; None when it is empty or being written."""
    try:
        return json.loads(path.read_text() or "null")
    except (OSError, ValueError):
        return None


def describe_holder(holder: dict | None) -> str:
    if not holder:
        return "another process that is just starting"
    job = f", torchrun job {holder['job']}" if holder.get("job") else ""
    return f"PID {holder.get('pid')}{job}: {holder.get('command')}"


def _is_launched_rank() -> bool:
    """A rank other than 0 of a torchrun / accelerate job: rank 0 holds the job's lock."""
    return int(os.environ.get("RANK", "0")) != 0


@contextmanager
def writer_lock(
    directory: str | Path, wait: bool = False, export: bool = False, create: bool = True
) -> Iterator[Path]:
    """Hold `directory`'s writer lock for the block; yields the lock file. Re-entrant within a process.

    create=False: a stage that needs the directory to exist takes no lock (and creates nothing) when it does
    not, and fails with its own message."""
    path = lock_file(directory, export)
    if _is_launched_rank() or not (create or path.parent.is_dir()):
        yield path
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    key = path.resolve()
    if key in _HELD:
        yield path
        return
    lock = FileLock(str(path), thread_local=False)
    _acquire(lock, path, directory, wait)
    _HELD[key] = lock
    try:
        _write_record(path, json.dumps(_holder_record()))
        yield path
    finally:
        del _HELD[key]
        _write_record(path, "")  # a writer refused before the next holder writes names no stale PID
        lock.release()


def _acquire(lock: FileLock, path: Path, directory: str | Path, wait: bool) -> None:
    try:
        lock.acquire(blocking=False)
        return
    except Timeout:
        holder = describe_holder(read_holder(path))
    if not wait:
        raise NestlingError(
            f"{directory}: another nestling process is writing here ({holder}); wait for it to finish, "
            "stop it, or add --wait"
        ) from None
    log.warning("%s: waiting for %s to finish (--wait)", directory, holder)
    t0 = time.monotonic()
    lock.acquire()
    log.info("%s: lock taken after %.0f s", directory, time.monotonic() - t0)


def _write_record(path: Path, text: str) -> None:
    """In place, never by rename: the flock belongs to this inode."""
    with open(path, "r+") as f:
        f.truncate(0)
        f.write(text)


def locked_by_another(directory: str | Path, export: bool = False) -> bool:
    """Another process holds `directory`'s writer lock now (a reader uses this to stay read-only)."""
    path = lock_file(directory, export)
    if path.resolve() in _HELD or _is_launched_rank() or not path.exists():
        return False
    probe = FileLock(str(path), thread_local=False)
    try:
        probe.acquire(blocking=False)
    except Timeout:
        return True
    probe.release()
    return False
