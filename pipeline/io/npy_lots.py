"""Per-wafer NumPy lots: `<lot_id>/<wafer_id>.npy`, plus `<wafer_id>.mask.npy` for a wafer with a mask.

Each file's header is checked (dtype, shape against the side limit, length) before its array is allocated,
and a symbolic link out of the lot directory is never followed."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np

from pipeline.atomic import atomic_file
from pipeline.io.common import (
    EMPTY_FILE,
    LINK_PROBLEM,
    PICKLE_PROBLEM,
    PICKLE_SUFFIXES,
    Item,
    PathLike,
    _leads_outside,
    _side_limit_problem,
    _unique_wafers,
)
from pipeline.wafer import Wafer, WaferError, check_id, validate_wafer

log = logging.getLogger(__name__)

MAX_ITEM_BYTES = 8  # the widest integer: with the side limit, it bounds what one .npy file can allocate
NPY_SUFFIX = ".npy"
MASK_SUFFIX = ".mask.npy"
NOT_A_WAFER_FILE = f"not a wafer file (expected <wafer_id>{NPY_SUFFIX} or <wafer_id>{MASK_SUFFIX})"


def write_npy_lots(wafers: Iterable[Wafer], root: PathLike) -> None:
    """root/<lot_id>/<wafer_id>.npy, plus <wafer_id>.mask.npy for a wafer with a mask."""
    root = Path(root)
    wafers = _unique_wafers(wafers, root)
    for wafer in wafers:
        lot_id = check_id(wafer.lot_id, "lot_id", root, wafer.lot_id, wafer.wafer_id)
        wafer_id = check_id(wafer.wafer_id, "wafer_id", root, wafer.lot_id, wafer.wafer_id)
        if (wafer_id + NPY_SUFFIX).endswith(MASK_SUFFIX):
            raise WaferError(root, f"a wafer_id ending in {MASK_SUFFIX.removesuffix(NPY_SUFFIX)!r} would be read "
                                   "back as a mask", lot_id, wafer_id)
        lot_dir = root / lot_id
        _save_npy(lot_dir / (wafer_id + NPY_SUFFIX), wafer.map)
        mask_path = lot_dir / (wafer_id + MASK_SUFFIX)
        if wafer.mask is not None:
            _save_npy(mask_path, wafer.mask)
        else:
            mask_path.unlink(missing_ok=True)  # a stale mask would be attached on the next read
    log.info("wrote %d wafers as NumPy lots under %s", len(wafers), root)


def _visible_entries(directory: Path) -> list[Path]:
    """Entries by name; dot-files are hidden (also the writers' half-written temporaries)."""
    try:
        return sorted(entry for entry in directory.iterdir() if not entry.name.startswith("."))
    except OSError as error:
        raise WaferError(directory, f"cannot list directory ({error})") from error


def _holds_wafers(directory: Path) -> bool:
    try:
        return any(entry.name.endswith(NPY_SUFFIX) and not entry.name.startswith(".") for entry in directory.iterdir())
    except OSError:
        return False


def _stray_file_problem(path: Path) -> str:
    return PICKLE_PROBLEM if path.suffix.lower() in PICKLE_SUFFIXES else NOT_A_WAFER_FILE


def _wafer_id_of(path: Path) -> str:
    for suffix in (MASK_SUFFIX, NPY_SUFFIX):
        if path.name.endswith(suffix):
            return path.name[: -len(suffix)]
    return path.name


def _read_npy_lot(lot_dir: Path, max_side: int) -> Iterator[Item]:
    lot_id = lot_dir.name
    try:
        entries = _visible_entries(lot_dir)
    except WaferError as error:
        yield error
        return
    files = {entry.name for entry in entries if entry.is_file()}
    for entry in sorted(entries, key=lambda entry: (_wafer_id_of(entry), entry.name)):
        wafer_id = _wafer_id_of(entry)
        if entry.is_dir():
            yield WaferError(entry, "a directory inside a lot directory is not read", lot_id)
        elif entry.name.endswith(MASK_SUFFIX):
            if wafer_id + NPY_SUFFIX not in files:
                yield WaferError(entry, f"mask without its map {wafer_id}{NPY_SUFFIX}", lot_id, wafer_id)
        elif entry.name.endswith(NPY_SUFFIX):
            yield _npy_wafer(entry, lot_id, wafer_id, max_side)
        else:
            yield WaferError(entry, _stray_file_problem(entry), lot_id)


def _npy_wafer(map_path: Path, lot_id: str, wafer_id: str, max_side: int) -> Item:
    mask_path = map_path.with_name(wafer_id + MASK_SUFFIX)
    try:
        wafer_map = _load_npy(map_path, lot_id, wafer_id, max_side)
        mask = _load_npy(mask_path, lot_id, wafer_id, max_side) if mask_path.is_file() else None
        return validate_wafer(lot_id, wafer_id, wafer_map, mask, source=map_path)
    except WaferError as error:
        return error


_NPY_HEADER_READERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}


def _load_npy(path: Path, lot_id: str, wafer_id: str, max_side: int) -> np.ndarray:
    """The array, after its header has been checked (object dtype, size, truncation) so that
    nothing is allocated for a file that would be refused anyway."""
    if _leads_outside(path, path.parent):
        raise WaferError(path, LINK_PROBLEM, lot_id, wafer_id)
    try:
        with open(path, "rb") as file:
            problem = _npy_header_problem(file, max_side)
            if problem:
                raise WaferError(path, problem, lot_id, wafer_id)
            file.seek(0)
            return np.lib.format.read_array(file, allow_pickle=False)
    except WaferError:
        raise
    except (OSError, ValueError, EOFError) as error:
        raise WaferError(path, f"unreadable or corrupt .npy file ({error})", lot_id, wafer_id) from error


def _npy_header_problem(file: BinaryIO, max_side: int) -> str | None:
    if os.fstat(file.fileno()).st_size == 0:
        return EMPTY_FILE
    version = np.lib.format.read_magic(file)
    if version not in _NPY_HEADER_READERS:
        return f"unsupported .npy format version {version}"
    shape, _fortran_order, dtype = _NPY_HEADER_READERS[version](file)
    if dtype.hasobject:
        return f"holds Python objects (dtype {dtype}); only plain integer arrays are accepted"
    if dtype.kind == "V" or dtype.itemsize > MAX_ITEM_BYTES:  # records, sub-arrays, wide types: never a map
        return f"holds dtype {dtype}; only plain integer arrays are accepted"
    if problem := _side_limit_problem(shape, max_side):
        return problem
    expected = math.prod(shape) * dtype.itemsize
    available = os.fstat(file.fileno()).st_size - file.tell()
    if available < expected:
        return f"truncated: the header promises {expected} data bytes, the file holds {available}"
    return None


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_file(path) as tmp, open(tmp, "wb") as file:
        np.save(file, array, allow_pickle=False)
