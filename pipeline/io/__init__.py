"""Readers and writers for every wafer-map input format of the product contract.

Formats: per-wafer NumPy lots (`<lot_id>/<wafer_id>.npy` plus `.mask.npy`), die tables (`.csv` or
`.parquet`, one row per die), wafer tables (`.parquet`, one row per wafer) and WM-811K (`LSWMD.pkl`, old
pandas pickles included, and its CSV form). Each has its module here (npy_lots, die_table, wafer_table,
wm811k; common holds what they share); this one tells which reader a source needs and runs it.

`Wafer.label` is the source's wafer-level label as written (a WM-811K failureType, MixedWM38 patterns
joined by '+', or `none`), normalised by `pipeline.labels.normalise_label`; never a class name.

Every reader yields validated `Wafer`s. Each bad input (a wafer, or a whole file that cannot be read)
becomes exactly one `WaferError` naming the file and, when known, the wafer: `read_wafers` raises the
first one, `iter_source` turns each into a `Rejected` record for the quarantine and goes on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.io.common import (
    CSV_SUFFIX,
    DEFAULT_LOT_WAFERS,
    EMPTY_FILE,
    LINK_PROBLEM,
    MAX_MAP_SIDE,
    MAX_TABLE_BYTES,
    PARQUET_SUFFIX,
    PICKLE_PROBLEM,
    PICKLE_SUFFIXES,
    Item,
    PathLike,
    Rejected,
    _csv_header,
    _leads_outside,
    parquet_column_bytes,
)
from pipeline.io.die_table import ID_COLUMNS, _read_die_table, write_die_table
from pipeline.io.npy_lots import (
    MASK_SUFFIX,
    NPY_SUFFIX,
    _holds_wafers,
    _read_npy_lot,
    _visible_entries,
    write_npy_lots,
)
from pipeline.io.wafer_table import is_wafer_table, read_wafer_table
from pipeline.io.wm811k import _read_wm811k_csv, _read_wm811k_pickle, write_wm811k_csv, write_wm811k_pickle
from pipeline.wafer import Wafer, WaferError

__all__ = [
    "DEFAULT_LOT_WAFERS", "DIE_TABLE", "ID_COLUMNS", "MASK_SUFFIX", "MAX_MAP_SIDE", "MAX_TABLE_BYTES", "NPY_LOT",
    "NPY_TREE", "WAFER_TABLE", "WM811K_CSV", "WM811K_PICKLE", "Rejected", "iter_source", "parquet_column_bytes",
    "read_wafers", "source_kind", "write_die_table", "write_npy_lots", "write_wm811k_csv", "write_wm811k_pickle",
]

log = logging.getLogger(__name__)

NPY_LOT, NPY_TREE, DIE_TABLE, WAFER_TABLE, WM811K_PICKLE, WM811K_CSV = (
    "npy_lot", "npy_tree", "die_table", "wafer_table", "wm811k_pickle", "wm811k_csv",
)


# --- public API ----------------------------------------------------------------------------------


def source_kind(path: PathLike) -> str:
    """Which reader a source needs; WaferError naming the path when it is missing or unknown."""
    path = Path(path)
    if path.is_dir():
        return _directory_kind(path)
    if not path.is_file():
        raise WaferError(path, "no such file or directory")
    if path.stat().st_size == 0:
        raise WaferError(path, EMPTY_FILE)
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        return WM811K_PICKLE
    if suffix == PARQUET_SUFFIX:
        return _parquet_kind(path)
    if suffix == CSV_SUFFIX:
        names, _ = _csv_header(path)
        return WM811K_CSV if "waferMap" in names else DIE_TABLE
    raise WaferError(
        path,
        f"unknown input format {suffix or '(no suffix)'!r}: expected a lot directory, a directory of lots, "
        "a .csv or .parquet die table, a .parquet wafer table, or a WM-811K .pkl or .csv",
    )


def iter_source(path: PathLike, max_map_side: int = MAX_MAP_SIDE, wafers_per_lot: int = DEFAULT_LOT_WAFERS,
                named: bool = False) -> Iterator[Wafer | Rejected]:
    """Lenient: every wafer of the source, each bad input as one Rejected with the reason.
    A map with more than `max_map_side` dies on a side is refused before it is allocated;
    `wafers_per_lot` groups the wafers of a wafer table that has no lot_id. `named`: the user gave this very
    path (command line or params.yaml); else it is an inbox entry, which is never unpickled nor followed
    out of the inbox by a symbolic link."""
    items = _read_items(Path(path), _openable_kind(path, named), max_map_side, wafers_per_lot)
    return (Rejected.from_error(item) if isinstance(item, WaferError) else item for item in items)


def read_wafers(path: PathLike, max_map_side: int = MAX_MAP_SIDE, wafers_per_lot: int = DEFAULT_LOT_WAFERS,
                named: bool = False) -> list[Wafer]:
    """Strict: every wafer of the source, or the WaferError of the first bad input."""
    wafers = []
    for item in _read_items(Path(path), _openable_kind(path, named), max_map_side, wafers_per_lot):
        if isinstance(item, WaferError):
            raise item
        wafers.append(item)
    return wafers


def _openable_kind(path: PathLike, named: bool) -> str:
    """The reader a source needs; an entry of an inbox (not `named`) is neither a pickle nor a symbolic link
    out of the inbox (the same rules as inside a lot directory)."""
    path = Path(path)
    if not named and _leads_outside(path, path.parent):
        raise WaferError(path, LINK_PROBLEM)
    kind = source_kind(path)
    if kind == WM811K_PICKLE and not named:
        raise WaferError(path, PICKLE_PROBLEM)
    return kind


# --- dispatch ------------------------------------------------------------------------------------


def _reader(kind: str, wafers_per_lot: int) -> Callable[[Path, int], Iterator[Item]]:
    return {
        NPY_LOT: _read_npy_lot,
        NPY_TREE: lambda path, max_side: _read_npy_tree(path, max_side, wafers_per_lot),
        DIE_TABLE: _read_die_table,
        WAFER_TABLE: lambda path, max_side: read_wafer_table(path, max_side, wafers_per_lot),
        WM811K_PICKLE: _read_wm811k_pickle,
        WM811K_CSV: _read_wm811k_csv,
    }[kind]


def _read_items(path: Path, kind: str, max_side: int, wafers_per_lot: int = DEFAULT_LOT_WAFERS) -> Iterator[Item]:
    wafers = rejected = 0
    for item in _reader(kind, wafers_per_lot)(path, max_side):
        if isinstance(item, WaferError):
            rejected += 1
            log.warning("rejected: %s", item)
        else:
            wafers += 1
        yield item
    log.info("read %s (%s): %d wafers, %d rejected", path, kind, wafers, rejected)


def _parquet_kind(path: Path) -> str:
    """A wafer table or a die table, by the columns of its schema (the footer only). A file whose schema
    cannot be read goes to the die-table reader, which refuses it as unreadable."""
    try:
        names = pq.read_schema(path).names
    except (OSError, pa.ArrowException):
        return DIE_TABLE
    return WAFER_TABLE if is_wafer_table(names) else DIE_TABLE


def _directory_kind(directory: Path) -> str:
    """A directory of lots when one of its directories holds wafers (a stray .npy beside lot directories must
    not turn an inbox into one lot) or when it holds no .npy at all (die or wafer tables); else one lot."""
    entries = _visible_entries(directory)
    if not entries:
        raise WaferError(directory, "empty directory: no .npy wafers and no lot directories")
    if any(_holds_wafers(entry) for entry in entries if entry.is_dir() and not _leads_outside(entry, directory)):
        return NPY_TREE
    if any(entry.is_file() and entry.name.endswith(NPY_SUFFIX) for entry in entries):
        return NPY_LOT
    return NPY_TREE


def _read_npy_tree(root: Path, max_side: int, wafers_per_lot: int = DEFAULT_LOT_WAFERS) -> Iterator[Item]:
    """Each lot directory, and each die table or wafer table beside them; never a pickle (an inbox entry)."""
    for entry in _visible_entries(root):
        if _leads_outside(entry, root):
            yield WaferError(entry, LINK_PROBLEM)
        elif entry.is_dir():
            yield from _read_npy_lot(entry, max_side)
        elif entry.name.endswith(NPY_SUFFIX):
            yield WaferError(entry, "a wafer file beside lot directories is not read: put it in a lot directory")
        else:
            try:
                kind = _openable_kind(entry, named=False)
            except WaferError as error:
                yield error
                continue
            yield from _reader(kind, wafers_per_lot)(entry, max_side)  # counted and logged by _read_items
