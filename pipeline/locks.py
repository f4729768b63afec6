"""Advisory file locks between processes (flock): the DVC workspace, the nightly workspace, one lot's report.

The kernel drops a flock when its holder dies, even by SIGKILL, so a crashed run never leaves a stale lock.
The lock file holds the holder's pid for the message the next process shows.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

POLL_S = 0.2


class LockHeld(RuntimeError):
    """Another process holds the lock; `holder` is what it wrote into the lock file."""

    def __init__(self, path: Path, holder: str, waited_s: float):
        self.path, self.holder, self.waited_s = path, holder, waited_s
        super().__init__(f"{path} is held by another process ({holder}); waited {waited_s:g} s")


def try_lock(path: Path) -> TextIO | None:
    """The open, locked lock file, or None at once when another process holds it. Close it to release."""
    try:
        handle = path.open("a+")
    except FileNotFoundError:  # the first lock of its folder
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = path.open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}")
    handle.flush()
    return handle


def release(handle: TextIO) -> None:
    handle.truncate(0)
    handle.close()  # closing the last descriptor drops the flock


def holder_of(path: Path) -> str:
    try:
        return path.read_text().strip() or "unknown"
    except OSError:
        return "unknown"


@contextmanager
def hold_lock(path: Path, timeout_s: float = 0.0) -> Iterator[None]:
    """Hold the lock at `path`, waiting up to timeout_s for its holder; LockHeld after that."""
    deadline = time.monotonic() + timeout_s
    while (handle := try_lock(path)) is None:
        if time.monotonic() >= deadline:
            raise LockHeld(path, holder_of(path), timeout_s)
        time.sleep(POLL_S)
    try:
        yield
    finally:
        release(handle)
