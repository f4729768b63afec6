"""Atomic writes: a file or directory is at every moment its old complete self or its new one.

What is written is built in a hidden sibling of its target (same file system, so one rename moves it into
place; readers skip dot-files) and renamed over the target only once it is complete. A writer killed midway
leaves the target as it was, plus a hidden leftover: a file's is harmless, a directory's is cleared by
`recover_directory`, which every directory writer runs first.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

STAGING_PREFIX, ASIDE_PREFIX = ".tmp-", ".old-"
_RENAME_EXCHANGE, _AT_FDCWD = 2, -100  # linux/fs.h, fcntl.h
_EXCHANGE_UNSUPPORTED = (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV)


@contextmanager
def atomic_file(path: str | os.PathLike[str], durable: bool = False, mode: int | None = None) -> Iterator[Path]:
    """A hidden temporary sibling of `path` for the caller to create and write; once the block ends without
    an error it replaces `path` in one rename, else it is deleted. Its name is unique to the process and the
    call (writers at once on one path do not share it); the caller creates the file, so it gets the mode
    open() gives, unless `mode` is set (chmod before the rename). `durable`: flushed to disk before the
    rename, so that a power cut cannot leave an empty or partial file under the target's name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        if mode is not None:
            os.chmod(tmp, mode)
        if durable:
            handle = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(handle)
            finally:
                os.close(handle)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def staging_directory(target: Path) -> Path:
    """A fresh hidden sibling of `target` to build it in (same file system: it can replace target by a rename)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{target.name}-", dir=target.parent))


def _leftovers(parent: Path) -> Iterator[tuple[str, str, Path]]:
    """(prefix, target name, path) of every staging or aside copy in `parent`: `<prefix><name>-XXXXXXXX`
    (mkdtemp and token_hex(4) both add 8 characters)."""
    if not parent.is_dir():
        return
    with os.scandir(parent) as entries:
        for entry in entries:
            for prefix in (STAGING_PREFIX, ASIDE_PREFIX):
                if entry.name.startswith(prefix) and len(entry.name) > len(prefix) + 9 and entry.name[-9] == "-":
                    yield prefix, entry.name[len(prefix):-9], Path(entry.path)


def _siblings(target: Path, prefix: str) -> list[Path]:
    return sorted(path for kind, name, path in _leftovers(target.parent) if kind == prefix and name == target.name)


def targets_with_leftovers(parent: Path) -> set[str]:
    """Names in `parent` that have staging or aside siblings: the only ones recover_directory has work for
    (one listing of `parent` instead of one per target)."""
    return {name for _, name, _ in _leftovers(parent)}


def recover_directory(target: Path) -> None:
    """Undo what a writer killed mid-replace left of `target`: its old copy put aside with no new one in
    place is put back, and stale staging and aside copies are deleted. Call it holding the target's lock."""
    asides = _siblings(target, ASIDE_PREFIX)
    if asides and not target.exists():
        log.warning("%s: restoring the copy a killed writer put aside (%s)", target, asides[-1].name)
        os.rename(asides.pop(), target)
    for leftover in [*asides, *_siblings(target, STAGING_PREFIX)]:
        shutil.rmtree(leftover, ignore_errors=True)


def _exchange(first: Path, second: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where it is unsupported."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in _EXCHANGE_UNSUPPORTED:
        return False
    raise OSError(code, os.strerror(code), str(second))


def replace_directory(built: Path, target: Path) -> None:
    """Make `built` the directory `target`: `target` is at every moment the old complete directory or the
    new one. An existing target is swapped with `built` in one atomic step where the file system can
    (renameat2), else renamed aside first and put back if the move fails; a kill between those two renames
    leaves the old copy aside, which `recover_directory` (run by every writer first) puts back."""
    if target.exists() and _exchange(built, target):
        shutil.rmtree(built, ignore_errors=True)  # it now holds the old directory
        return
    if not target.exists():
        os.rename(built, target)
        return
    aside = target.parent / f"{ASIDE_PREFIX}{target.name}-{secrets.token_hex(4)}"
    os.rename(target, aside)
    try:
        os.rename(built, target)
    except BaseException:
        os.rename(aside, target)
        raise
    shutil.rmtree(aside, ignore_errors=True)
