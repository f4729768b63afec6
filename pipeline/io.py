"""Readers and writers for every wafer-map input format of the product contract.

Formats: per-wafer NumPy lots (`<lot_id>/<wafer_id>.npy` plus `.mask.npy`), die tables (`.csv` or
`.parquet`, one row per die), wafer tables (`.parquet`, one row per wafer: pipeline/wafer_table.py) and
WM-811K (`LSWMD.pkl`, old pandas pickles included, and its CSV form).

`Wafer.label` is the source's wafer-level label as written (a WM-811K failureType, MixedWM38 patterns
joined by '+', or `none`), normalised by `pipeline.labels.normalise_label`; never a class name.

Every reader yields validated `Wafer`s. Each bad input (a wafer, or a whole file that cannot be read)
becomes exactly one `WaferError` naming the file and, when known, the wafer: `read_wafers` raises the
first one, `iter_source` turns each into a `Rejected` record for the quarantine and goes on.
"""

from __future__ import annotations

import codecs
import copyreg
import csv
import ctypes
import errno
import functools
import glob
import json
import logging
import math
import os
import pickle
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
from pandas.compat import pickle_compat

from pipeline.labels import WM811K_LABELS
from pipeline.wafer import FAIL, NUM_CLASSES, PASS, Wafer, WaferError, check_id, validate_wafer

log = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]
Item = Wafer | WaferError

NPY_LOT, NPY_TREE, DIE_TABLE, WAFER_TABLE, WM811K_PICKLE, WM811K_CSV = (
    "npy_lot", "npy_tree", "die_table", "wafer_table", "wm811k_pickle", "wm811k_csv",
)

MAX_MAP_SIDE = 4096  # default dies per map side; larger maps are refused before anything is allocated
DEFAULT_LOT_WAFERS = 25  # a wafer table without lot_id: consecutive wafers form lots of this many
MAX_TABLE_BYTES = 4 << 30  # a die table, or a wafer table's row group, larger than this (uncompressed) is refused unread
MAX_ITEM_BYTES = 8  # the widest integer: with the side limit, it bounds what one .npy file can allocate
NPY_SUFFIX = ".npy"
MASK_SUFFIX = ".mask.npy"
PICKLE_SUFFIXES = (".pkl", ".pickle")
CSV_SUFFIX, PARQUET_SUFFIX = ".csv", ".parquet"
CSV_HEADER_MAX_BYTES = 1 << 16

ID_COLUMNS = ("lot_id", "wafer_id")
DIE_TABLE_COLUMNS = (*ID_COLUMNS, "row", "col", "bin")
LABEL_COLUMN = "label"
SHAPE_COLUMNS = ("map_rows", "map_cols")

WM811K_COLUMNS = ("waferMap", "dieSize", "lotName", "waferIndex", "trianTestLabel", "failureType")
WM811K_REQUIRED = ("waferMap", "lotName", "waferIndex")
WM811K_CSV_SEPARATOR = "\t"
WM811K_CSV_CHUNK_ROWS = 1000
WM811K_TRAINING = "Training"

PICKLE_PROBLEM = "pickles are only read when named explicitly (a pickle runs code); not opened"
LINK_PROBLEM = "a symbolic link that leads out of its directory; not followed"
EMPTY_FILE = "empty file (0 bytes)"
NUMBER_PATTERN = r"^\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*$"  # text a die table may hold for a number
NOT_A_WAFER_FILE = f"not a wafer file (expected <wafer_id>{NPY_SUFFIX} or <wafer_id>{MASK_SUFFIX})"


@dataclass(frozen=True)
class Rejected:
    """An input that could not become a Wafer, with the reason for the quarantine."""

    source: str
    lot_id: str | None
    wafer_id: str | None
    reason: str

    @classmethod
    def from_error(cls, error: WaferError) -> Rejected:
        return cls(error.source, error.lot_id, error.wafer_id, str(error))


# --- public API ------------------------------------------------------------------------------


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


def write_die_table(wafers: Iterable[Wafer], path: PathLike) -> None:
    """One row per on-wafer die; `label` when any wafer has a mask (null for the others);
    `map_rows`/`map_cols` so that trailing off-wafer rows and columns survive the round trip."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (CSV_SUFFIX, PARQUET_SUFFIX):
        raise WaferError(path, f"a die table is written as .csv or .parquet, not {suffix or '(no suffix)'!r}")
    wafers = _unique_wafers(wafers, path)
    table = _die_table_of(wafers)
    with _atomic_target(path) as tmp:
        if suffix == PARQUET_SUFFIX:
            pq.write_table(table, str(tmp))
        else:
            pa_csv.write_csv(table, str(tmp))
    log.info("wrote %d wafers, %d dies to die table %s", len(wafers), table.num_rows, path)


def write_wm811k_csv(wafers: Iterable[Wafer], path: PathLike) -> None:
    """WM-811K's CSV form (tab-separated, index column first, waferMap as a nested list)."""
    path = Path(path)
    wafers = _unique_wafers(wafers, path)
    _warn_dropped_masks(wafers, path)
    with _atomic_target(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as out:
        for start in range(0, max(len(wafers), 1), WM811K_CSV_CHUNK_ROWS):
            chunk = wafers[start : start + WM811K_CSV_CHUNK_ROWS]
            frame = _wm811k_frame(chunk, path, as_text=True, first_index=start)
            frame.to_csv(out, sep=WM811K_CSV_SEPARATOR, header=start == 0)
    log.info("wrote %d wafers to WM-811K CSV %s", len(wafers), path)


def write_wm811k_pickle(wafers: Iterable[Wafer], path: PathLike) -> None:
    """A pandas pickle of a DataFrame laid out like LSWMD.pkl."""
    path = Path(path)
    wafers = _unique_wafers(wafers, path)
    _warn_dropped_masks(wafers, path)
    frame = _wm811k_frame(wafers, path, as_text=False, first_index=0)
    with _atomic_target(path) as tmp:
        frame.to_pickle(tmp)
    log.info("wrote %d wafers to WM-811K pickle %s", len(wafers), path)


# --- dispatch --------------------------------------------------------------------------------


def _reader(kind: str, wafers_per_lot: int) -> Callable[[Path, int], Iterator[Item]]:
    from pipeline.wafer_table import read_wafer_table  # it builds on this module's helpers

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
    from pipeline.wafer_table import is_wafer_table

    try:
        names = pq.read_schema(path).names
    except (OSError, pa.ArrowException):
        return DIE_TABLE
    return WAFER_TABLE if is_wafer_table(names) else DIE_TABLE


def _side_limit_problem(shape: tuple[int, ...], max_side: int) -> str | None:
    if max(shape, default=0) > max_side or math.prod(shape) > max_side**2:
        return f"map shape {tuple(shape)} exceeds the limit of {max_side} dies per side"
    return None


def _check_side_limit(shape: tuple[int, ...], max_side: int, source: object, lot_id: object,
                      wafer_id: object) -> None:
    problem = _side_limit_problem(shape, max_side)
    if problem:
        raise WaferError(source, problem, lot_id, wafer_id)


def _require_columns(names: Iterable[str], required: Iterable[str], source: Path) -> None:
    present = set(names)
    missing = [name for name in required if name not in present]
    if missing:
        raise WaferError(source, f"missing required column(s) {', '.join(missing)}")


def _csv_header(path: Path) -> tuple[list[str], str]:
    """Column names and delimiter (tab when the header holds one, else comma)."""
    try:
        with open(path, "rb") as file:
            line = file.readline(CSV_HEADER_MAX_BYTES).decode("utf-8-sig", errors="replace")
    except OSError as error:
        raise WaferError(path, f"cannot read ({error})") from error
    delimiter = "\t" if "\t" in line else ","
    try:
        names = next(csv.reader([line.rstrip("\r\n")], delimiter=delimiter), [])
    except csv.Error as error:  # a bare carriage return inside the header, say
        raise WaferError(path, f"unreadable CSV header ({error})") from None
    return [name.strip() for name in names], delimiter


# --- per-wafer NumPy lots --------------------------------------------------------------------


def _visible_entries(directory: Path) -> list[Path]:
    """Entries by name; dot-files are hidden (also the writers' half-written temporaries)."""
    try:
        return sorted(entry for entry in directory.iterdir() if not entry.name.startswith("."))
    except OSError as error:
        raise WaferError(directory, f"cannot list directory ({error})") from error


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


def _holds_wafers(directory: Path) -> bool:
    try:
        return any(entry.name.endswith(NPY_SUFFIX) and not entry.name.startswith(".") for entry in directory.iterdir())
    except OSError:
        return False


def _stray_file_problem(path: Path) -> str:
    return PICKLE_PROBLEM if path.suffix.lower() in PICKLE_SUFFIXES else NOT_A_WAFER_FILE


def _leads_outside(entry: Path, directory: Path) -> bool:
    """A symbolic link whose target is not inside `directory`: following it would read what the
    directory does not hold (another lot, or any file the process can open)."""
    if not entry.is_symlink():
        return False
    return not Path(os.path.realpath(entry)).is_relative_to(os.path.realpath(directory))


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
    with _atomic_target(path) as tmp, open(tmp, "wb") as file:
        np.save(file, array, allow_pickle=False)


# --- die tables ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Dies:
    """A die table's columns as NumPy arrays, rows grouped by wafer (sorted by lot, wafer)."""

    max_side: int  # dies per map side
    lot_ids: np.ndarray  # per wafer
    wafer_ids: np.ndarray  # per wafer
    starts: np.ndarray  # per wafer: its first row
    ends: np.ndarray  # per wafer: one past its last row
    row: np.ndarray  # int64, clipped to [-1, max_side + 1]
    col: np.ndarray
    bin: np.ndarray  # as stored (integer or float), nulls and text as 0
    null: np.ndarray  # row, col or bin is null
    non_integer: np.ndarray  # row or col is not a whole number
    not_number: dict[str, np.ndarray]  # per numeric column: text that does not read as a number
    label: np.ndarray | None  # as stored, nulls and text as 0
    label_null: np.ndarray | None
    map_rows: np.ndarray | None  # int64, clipped like row
    map_cols: np.ndarray | None
    map_shape_bad: np.ndarray | None  # map_rows or map_cols is null or not a whole number


def _read_die_table(path: Path, max_side: int) -> Iterator[Item]:
    try:
        dies = _group_dies(_die_table_arrow(path), path, max_side)
    except WaferError as error:
        yield error
        return
    except (OSError, pa.ArrowException) as error:
        yield WaferError(path, f"unreadable die table ({error})")
        return
    for index in range(len(dies.starts)):
        try:
            yield _die_table_wafer(dies, index, path)
        except WaferError as error:
            yield error


def parquet_column_bytes(metadata: pq.FileMetaData, columns: Iterable[str]) -> list[int]:
    """The uncompressed bytes of `columns` in each row group, from the footer: what reading them takes."""
    columns = set(columns)
    return [sum(group.column(i).total_uncompressed_size for i in range(group.num_columns)
                if group.column(i).path_in_schema in columns)
            for group in map(metadata.row_group, range(metadata.num_row_groups))]


def _check_table_bytes(path: Path, size: int, what: str) -> None:
    if size > MAX_TABLE_BYTES:
        raise WaferError(path, f"{what} holds {size:,} bytes; the limit is {MAX_TABLE_BYTES:,} (io.MAX_TABLE_BYTES): "
                               "split it into smaller files")


def _die_table_arrow(path: Path) -> pa.Table:
    """The contract's columns, read straight into Arrow (CSV ids as bytes: see _id_ranks). The size is checked
    first, from the Parquet footer (uncompressed bytes of those columns) or the CSV file's length."""
    wanted = (*DIE_TABLE_COLUMNS, LABEL_COLUMN, *SHAPE_COLUMNS)
    if path.suffix.lower() == PARQUET_SUFFIX:
        metadata = pq.read_metadata(path)
        names = metadata.schema.names
        _require_columns(names, DIE_TABLE_COLUMNS, path)
        columns = [name for name in wanted if name in names]
        _check_table_bytes(path, sum(parquet_column_bytes(metadata, columns)), "the die table (uncompressed)")
        table = pq.read_table(path, columns=columns)
    else:
        names, delimiter = _csv_header(path)
        _require_columns(names, DIE_TABLE_COLUMNS, path)
        _check_table_bytes(path, path.stat().st_size, "the die table")
        table = pa_csv.read_csv(
            path,
            parse_options=pa_csv.ParseOptions(delimiter=delimiter),
            convert_options=pa_csv.ConvertOptions(
                include_columns=[name for name in wanted if name in names],
                column_types={name: pa.binary() for name in ID_COLUMNS},
            ),
        )
    if table.num_rows == 0:
        raise WaferError(path, "no dies: the table has its columns but no rows")
    return table


def _is_text(kind: pa.DataType) -> bool:
    return any(is_kind(kind) for is_kind in (pa.types.is_string, pa.types.is_large_string, pa.types.is_binary,
                                             pa.types.is_large_binary))


def _id_ranks(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's rank among the sorted distinct ids, and those ids (hash-based; no per-row objects).

    Ids are compared as bytes and decoded once per distinct id: bytes that are not UTF-8 (a latin-1
    file, say) become surrogate escapes, which check_id refuses for that wafer alone."""
    if not _is_text(column.type):
        column = column.cast(pa.string())
    values = pc.fill_null(column.cast(pa.large_binary()), b"")  # an empty id is refused by check_id
    distinct = pc.unique(values)
    distinct = distinct.take(pc.sort_indices(distinct))
    ranks = pc.index_in(values, value_set=distinct).to_numpy()
    names = np.array([value.decode("utf-8", "surrogateescape") for value in distinct.to_pylist()], dtype=object)
    return ranks.astype(np.int64), names


def _numbers(table: pa.Table, name: str, path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A numeric column as a NumPy array with nulls as 0, the null flags, and the flags of text that does
    not read as a number (a text column is parsed cell by cell, so that one bad cell refuses one wafer)."""
    column = table.column(name)
    if pa.types.is_null(column.type):  # a CSV column with no value at all
        column = column.cast(pa.int64())
    nulls = column.is_null().to_numpy(zero_copy_only=False)
    not_number = np.zeros(len(nulls), dtype=bool)
    if _is_text(column.type):
        column, not_number = _parse_numbers(column)
    if not (pa.types.is_integer(column.type) or pa.types.is_floating(column.type)):
        raise WaferError(path, f"column {name!r} has type {column.type}; numbers are required")
    return pc.fill_null(column, 0).to_numpy(), nulls, not_number


def _parse_numbers(text: pa.ChunkedArray) -> tuple[pa.ChunkedArray, np.ndarray]:
    """The cells that read as a number, as float64 (other cells null), and the flags of the others."""
    numeric = pc.match_substring_regex(text, NUMBER_PATTERN)
    not_number = pc.and_(pc.is_valid(text), pc.invert(pc.fill_null(numeric, False)))
    kept = pc.if_else(numeric, text, None).cast(pa.large_string())  # only ASCII digits and signs are left
    return pc.utf8_trim_whitespace(kept).cast(pa.float64()), not_number.to_numpy(zero_copy_only=False)


def _whole_numbers(values: np.ndarray, max_side: int) -> tuple[np.ndarray, np.ndarray]:
    """Values as int64 clipped to [-1, max_side + 1] (enough to tell negative and too large,
    and no overflow), and the flags of values that are not whole numbers."""
    top = max_side + 1
    if np.issubdtype(values.dtype, np.unsignedinteger):
        return np.minimum(values, top).astype(np.int64), np.zeros(len(values), dtype=bool)
    if np.issubdtype(values.dtype, np.integer):
        return np.clip(values, -1, top).astype(np.int64), np.zeros(len(values), dtype=bool)
    whole = np.isfinite(values) & (values == np.round(values))
    return np.clip(np.where(whole, values, 0), -1, top).astype(np.int64), ~whole


def _group_dies(table: pa.Table, path: Path, max_side: int) -> _Dies:
    """Sort the dies by (lot, wafer) with one stable argsort and find each wafer's slice."""
    lot_ranks, lot_names = _id_ranks(table.column("lot_id"))
    wafer_ranks, wafer_names = _id_ranks(table.column("wafer_id"))
    n_wafer_names = max(len(wafer_names), 1)
    pair = lot_ranks * n_wafer_names + wafer_ranks
    order = np.argsort(pair, kind="stable")
    pair = pair[order]
    starts = np.flatnonzero(np.diff(pair, prepend=-1))
    ends = np.append(starts[1:], len(pair))[: len(starts)]
    keys = pair[starts]
    not_number: dict[str, np.ndarray] = {}

    def column(name: str) -> tuple[np.ndarray, np.ndarray]:
        values, nulls, text = _numbers(table, name, path)
        not_number[name] = text[order]
        return values[order], nulls[order]

    row, row_null = column("row")
    col, col_null = column("col")
    bins, bin_null = column("bin")
    row, row_fraction = _whole_numbers(row, max_side)
    col, col_fraction = _whole_numbers(col, max_side)
    label = label_null = None
    if LABEL_COLUMN in table.column_names:
        label, label_null = column(LABEL_COLUMN)
    map_rows = map_cols = map_shape_bad = None
    shape_columns = [name in table.column_names for name in SHAPE_COLUMNS]
    if any(shape_columns) and not all(shape_columns):
        raise WaferError(path, f"columns {' and '.join(SHAPE_COLUMNS)} come together; only one is present")
    if all(shape_columns):
        (map_rows, rows_null), (map_cols, cols_null) = column(SHAPE_COLUMNS[0]), column(SHAPE_COLUMNS[1])
        map_rows, rows_fraction = _whole_numbers(map_rows, max_side)
        map_cols, cols_fraction = _whole_numbers(map_cols, max_side)
        map_shape_bad = rows_null | cols_null | rows_fraction | cols_fraction
    return _Dies(
        max_side=max_side,
        lot_ids=lot_names[keys // n_wafer_names],
        wafer_ids=wafer_names[keys % n_wafer_names],
        starts=starts,
        ends=ends,
        row=row,
        col=col,
        bin=bins,
        null=row_null | col_null | bin_null,
        non_integer=row_fraction | col_fraction,
        not_number=not_number,
        label=label,
        label_null=label_null,
        map_rows=map_rows,
        map_cols=map_cols,
        map_shape_bad=map_shape_bad,
    )


def _examples(values: np.ndarray) -> str:
    return ", ".join(str(value) for value in np.unique(values)[:5])


def _die_problems(dies: _Dies, part: slice) -> list[str]:
    """What is wrong with the dies of one wafer, checked on its slice only."""
    problems = [f"{np.count_nonzero(text[part])} dies with a {name} that is not a number"
                for name, text in dies.not_number.items() if text[part].any()]
    null, non_integer = dies.null[part], dies.non_integer[part]
    row, col, bins = dies.row[part], dies.col[part], dies.bin[part]
    if null.any():
        problems.append(f"{np.count_nonzero(null)} dies with a null row, col or bin")
    if non_integer.any():
        problems.append(f"{np.count_nonzero(non_integer)} dies with a non-integer row or col")
    if ((row < 0) | (col < 0)).any():
        problems.append(f"{np.count_nonzero((row < 0) | (col < 0))} dies with a negative row or col")
    if ((row >= dies.max_side) | (col >= dies.max_side)).any():
        problems.append(f"row or col beyond the limit of {dies.max_side} dies per side")
    bad_bin = ~null & ~dies.not_number["bin"][part] & (bins != PASS) & (bins != FAIL)
    if bad_bin.any():
        problems.append(f"{np.count_nonzero(bad_bin)} dies with bin outside {{{PASS}, {FAIL}}} "
                        f"(values {_examples(bins[bad_bin])})")
    if dies.label is not None:
        problems += _label_problems(dies, part)
    return problems


def _label_problems(dies: _Dies, part: slice) -> list[str]:
    label_null = dies.label_null[part]
    if label_null.all():
        return []  # a wafer without a mask in a file where others have one
    if label_null.any():
        return [f"{np.count_nonzero(label_null)} dies with a null label while other dies have one"]
    label = dies.label[part]
    bad = ~np.isin(label, np.arange(NUM_CLASSES))
    if not bad.any():
        return []
    return [f"{np.count_nonzero(bad)} dies with label outside 0..{NUM_CLASSES - 1} (values {_examples(label[bad])})"]


def _map_shape(dies: _Dies, part: slice) -> tuple[tuple[int, int], str | None]:
    """(max row + 1, max col + 1), or the stored map_rows/map_cols when the file has them;
    and what is wrong with the stored ones."""
    needed = (int(dies.row[part].max()) + 1, int(dies.col[part].max()) + 1)
    if dies.map_rows is None:
        return needed, None
    if dies.map_shape_bad[part].any():
        return needed, "map_rows/map_cols are null or not whole numbers"
    rows, cols = dies.map_rows[part], dies.map_cols[part]
    if rows.min() != rows.max() or cols.min() != cols.max():
        return needed, "map_rows/map_cols differ between dies of one wafer"
    shape = (int(rows[0]), int(cols[0]))  # clipped to max_side + 1 when larger
    if max(shape) > dies.max_side:
        return needed, f"map_rows/map_cols beyond the limit of {dies.max_side} dies per side"
    if shape[0] < needed[0] or shape[1] < needed[1]:
        return needed, f"map_rows x map_cols {shape} is too small for the dies, which need {needed}"
    return shape, None


def _die_table_wafer(dies: _Dies, index: int, path: Path) -> Wafer:
    lot_id, wafer_id = dies.lot_ids[index], dies.wafer_ids[index]
    part = slice(dies.starts[index], dies.ends[index])
    problems = _die_problems(dies, part)
    if problems:
        raise WaferError(path, "; ".join(problems), lot_id, wafer_id)
    shape, problem = _map_shape(dies, part)
    if problem:
        raise WaferError(path, problem, lot_id, wafer_id)
    row, col = dies.row[part], dies.col[part]
    grid = np.zeros(shape, dtype=np.uint8)
    grid[row, col] = dies.bin[part]
    duplicates = len(row) - np.count_nonzero(grid)  # every bin is non-zero, so lost dies were overwritten
    if duplicates:
        raise WaferError(path, f"{duplicates} duplicate (row, col) dies, e.g. {_first_duplicate(row, col)}",
                         lot_id, wafer_id)
    mask = None
    if dies.label is not None and not dies.label_null[part].all():
        mask = np.zeros(shape, dtype=np.uint8)
        mask[row, col] = dies.label[part]
    return validate_wafer(lot_id, wafer_id, grid, mask, source=path)


def _first_duplicate(row: np.ndarray, col: np.ndarray) -> tuple[int, int]:
    positions, counts = np.unique(np.stack([row, col], axis=1), axis=0, return_counts=True)
    first = positions[np.argmax(counts > 1)]
    return int(first[0]), int(first[1])


def _concatenate(parts: list[np.ndarray], dtype: type) -> np.ndarray:
    return np.concatenate(parts).astype(dtype, copy=False) if parts else np.empty(0, dtype=dtype)


def _die_table_of(wafers: list[Wafer]) -> pa.Table:
    """The die table of some wafers, built with NumPy per wafer (never per die)."""
    positions = [np.nonzero(wafer.map) for wafer in wafers]
    counts = np.array([len(rows) for rows, _ in positions], dtype=np.int64)
    owner = pa.array(np.repeat(np.arange(len(wafers)), counts))
    columns: dict[str, pa.Array] = {
        "lot_id": pa.array([wafer.lot_id for wafer in wafers], pa.string()).take(owner),
        "wafer_id": pa.array([wafer.wafer_id for wafer in wafers], pa.string()).take(owner),
        "row": pa.array(_concatenate([rows for rows, _ in positions], np.int16)),
        "col": pa.array(_concatenate([cols for _, cols in positions], np.int16)),
        "bin": pa.array(_concatenate([w.map[p] for w, p in zip(wafers, positions)], np.uint8)),
    }
    if any(wafer.mask is not None for wafer in wafers):
        labels = [np.zeros(len(p[0]), np.uint8) if w.mask is None else w.mask[p] for w, p in zip(wafers, positions)]
        unlabelled = np.repeat([wafer.mask is None for wafer in wafers], counts)
        columns[LABEL_COLUMN] = pa.array(_concatenate(labels, np.uint8), mask=unlabelled)
    shapes = np.array([wafer.shape for wafer in wafers], dtype=np.int16).reshape(-1, 2)
    columns[SHAPE_COLUMNS[0]] = pa.array(np.repeat(shapes[:, 0], counts))
    columns[SHAPE_COLUMNS[1]] = pa.array(np.repeat(shapes[:, 1], counts))
    return pa.table(columns)


# --- WM-811K ---------------------------------------------------------------------------------

# Old pandas (< 0.20) kept its indexes in `pandas.indexes`; these globals moved or were removed.
# pandas' own compat table covers the later moves, not these.
_OLD_PANDAS_INDEXES = "pandas.indexes."
_OLD_PANDAS_GLOBALS: dict[tuple[str, str], tuple[str, str]] = {
    ("pandas.indexes.numeric", "Int64Index"): ("pandas.core.indexes.base", "Index"),
    ("pandas.indexes.numeric", "UInt64Index"): ("pandas.core.indexes.base", "Index"),
    ("pandas.indexes.numeric", "Float64Index"): ("pandas.core.indexes.base", "Index"),
    ("pandas.core.base", "FrozenNDArray"): ("numpy", "ndarray"),
    ("pandas.core.base", "FrozenList"): ("pandas.core.indexes.frozen", "FrozenList"),
}


def _current_global(module: str, name: str) -> tuple[str, str]:
    if (module, name) in _OLD_PANDAS_GLOBALS:
        return _OLD_PANDAS_GLOBALS[module, name]
    if module.startswith(_OLD_PANDAS_INDEXES):
        return "pandas.core.indexes." + module[len(_OLD_PANDAS_INDEXES) :], name
    return module, name


# What a DataFrame laid out like LSWMD.pkl is made of, by package; any other global in a pickle is refused
# before its module is imported, and a global must resolve to one of these objects: no pickle named by a
# user can call a function (os.system, pandas.read_pickle...) or build an object of another class.
_PICKLE_MODULE_ROOTS = ("numpy", "pandas", "pyarrow", "builtins", "__builtin__", "copyreg", "_codecs")


@functools.cache
def _allowed_pickle_globals() -> frozenset[int]:
    from numpy._core import multiarray, numeric
    from pandas._libs import internals as libinternals
    from pandas.arrays import ArrowStringArray
    from pandas.core.indexes import base as index_base
    from pandas.core.internals import blocks, managers

    allowed = [np.ndarray, np.dtype, multiarray._reconstruct, multiarray.scalar, numeric._frombuffer,
               *(type(np.dtype(code)) for code in "?bhilqBHILQefdgFDGSUVOMm"),
               pd.DataFrame, pd.Series, pd.Index, pd.RangeIndex, pd.StringDtype, ArrowStringArray,
               index_base._new_Index, managers.BlockManager, managers.SingleBlockManager,
               libinternals._unpickle_block, libinternals.BlockPlacement, blocks.new_block,
               *(c for c in vars(blocks).values() if isinstance(c, type) and issubclass(c, blocks.Block)),
               pa.lib._restore_array, pa.lib.type_for_alias, pa.lib.py_buffer,
               slice, bytes, bytearray, str, int, float, complex, bool, list, tuple, dict, set, frozenset, object,
               copyreg._reconstructor, codecs.encode]
    return frozenset(id(item) for item in allowed)


def _restricted_global(find_class: Callable[[str, str], Any], module: str, name: str) -> Any:
    module, name = _current_global(module, name)
    if module.split(".")[0] not in _PICKLE_MODULE_ROOTS:
        raise pickle.UnpicklingError(f"refused global {module}.{name}: not part of a WM-811K DataFrame")
    found = find_class(module, name)
    if id(found) not in _allowed_pickle_globals():
        raise pickle.UnpicklingError(f"refused global {module}.{name}: not part of a WM-811K DataFrame")
    return found


class _AliasingUnpickler(pickle.Unpickler):
    """The C unpickler, with old pandas module paths mapped to current ones, restricted to LSWMD's globals."""

    def find_class(self, module: str, name: str) -> Any:
        return _restricted_global(super().find_class, module, name)


class _CompatUnpickler(pickle_compat.Unpickler):
    """pandas' pure-Python compat unpickler (its own renames and reduce fixes), plus our aliases and the
    same restriction."""

    def find_class(self, module: str, name: str) -> Any:
        return _restricted_global(super().find_class, module, name)


# What pandas.read_pickle itself answers by retrying with its compat unpickler.
_RETRY_WITH_COMPAT = (AttributeError, ImportError, TypeError, ValueError)


def _unpickle(path: Path) -> object:
    # latin1: Python 2 pickles hold NumPy buffers as byte strings; Python 3 pickles are unaffected.
    with open(path, "rb") as file:
        try:
            return _AliasingUnpickler(file, encoding="latin1").load()
        except _RETRY_WITH_COMPAT as error:
            log.info("%s: retrying with pandas' compat unpickler after %s: %s", path, type(error).__name__, error)
            file.seek(0)
            return _CompatUnpickler(file, encoding="latin1").load()


def _load_wm811k_frame(path: Path) -> pd.DataFrame:
    try:
        frame = _unpickle(path)
    except Exception as error:  # unpickling can raise whatever the pickled globals raise
        raise WaferError(path, f"cannot unpickle ({type(error).__name__}: {error})") from error
    if not isinstance(frame, pd.DataFrame):
        raise WaferError(path, f"holds a {type(frame).__name__}, not a WM-811K DataFrame")
    _require_columns(frame.columns, WM811K_REQUIRED, path)
    return frame


def _read_wm811k_pickle(path: Path, max_side: int) -> Iterator[Item]:
    try:
        frame = _load_wm811k_frame(path)
    except WaferError as error:
        yield error
        return
    failure_types = frame["failureType"] if "failureType" in frame.columns else repeat(None)
    rows = zip(frame["waferMap"], frame["lotName"], frame["waferIndex"], failure_types)
    yield from _wm811k_items(path, rows, max_side)


def _read_wm811k_csv(path: Path, max_side: int) -> Iterator[Item]:
    try:
        names, delimiter = _csv_header(path)
        _require_columns(names, WM811K_REQUIRED, path)
    except WaferError as error:
        yield error
        return
    yield from _wm811k_items(path, _wm811k_csv_rows(path, names, delimiter), max_side)


def _wm811k_csv_rows(path: Path, names: list[str], delimiter: str) -> Iterator[tuple[str, str, str, str | None]]:
    """(waferMap, lotName, waferIndex, failureType) as text, read in chunks; WaferError if the file breaks."""
    has_failure_type = "failureType" in names
    columns = [*WM811K_REQUIRED, *(["failureType"] if has_failure_type else [])]
    try:
        chunks = pd.read_csv(path, sep=delimiter, usecols=columns, dtype=str, keep_default_na=False,
                             na_filter=False, chunksize=WM811K_CSV_CHUNK_ROWS)
        for chunk in chunks:
            failure_types = chunk["failureType"] if has_failure_type else repeat(None)
            yield from zip(chunk["waferMap"], chunk["lotName"], chunk["waferIndex"], failure_types)
    except (OSError, ValueError) as error:  # pandas' ParserError is a ValueError
        raise WaferError(path, f"unreadable WM-811K CSV ({error})") from error


def _wm811k_items(path: Path, rows: Iterator[tuple[Any, Any, Any, Any]], max_side: int) -> Iterator[Item]:
    first_row_of: dict[tuple[str, str], int] = {}
    try:
        for number, (wafer_map, lot_name, wafer_index, failure_type) in enumerate(rows):
            try:
                yield _wm811k_wafer(path, number, wafer_map, lot_name, wafer_index, failure_type, first_row_of,
                                    max_side)
            except WaferError as error:
                yield error
    except WaferError as error:  # the rest of the file could not be read
        yield error


def _wm811k_wafer(path: Path, number: int, wafer_map: Any, lot_name: Any, wafer_index: Any, failure_type: Any,
                  first_row_of: dict[tuple[str, str], int], max_side: int) -> Wafer:
    lot_id = "" if _is_missing(lot_name) else str(lot_name)
    wafer_id = _wafer_id_of_index(wafer_index, path, number, lot_id)
    label = _wm811k_label(failure_type, path, number, lot_id, wafer_id)
    grid = _parse_wafer_map(wafer_map, path, number, lot_id, wafer_id, max_side)
    first = first_row_of.setdefault((lot_id, wafer_id), number)
    if first != number:
        raise WaferError(path, f"data row {number} repeats the wafer of data row {first}", lot_id, wafer_id)
    return validate_wafer(lot_id, wafer_id, grid, source=path, label=label)


def _wafer_id_of_index(wafer_index: Any, path: Path, number: int, lot_id: str) -> str:
    try:
        value = float(wafer_index)
    except (TypeError, ValueError):
        value = math.nan
    if not (math.isfinite(value) and value.is_integer()):
        raise WaferError(path, f"data row {number}: waferIndex {wafer_index!r} is not an integer", lot_id)
    return str(int(value))


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _failure_type_name(value: Any) -> str:
    """'Edge-Loc' from [['Edge-Loc']] (array or its CSV text); '' when unlabelled."""
    if _is_missing(value):
        return ""
    if isinstance(value, str):
        return value.strip("[]'\" \t")
    flat = np.asarray(value).ravel()
    if flat.size == 0:
        return ""
    first = flat[0]
    return (first.decode("latin1") if isinstance(first, bytes) else str(first)).strip()


def _wm811k_label(value: Any, path: Path, number: int, lot_id: str, wafer_id: str) -> str | None:
    """The failureType as written (already the normalised spelling of a single WM-811K label); None when
    unlabelled."""
    name = _failure_type_name(value)
    if not name:
        return None
    if name not in WM811K_LABELS:
        raise WaferError(path, f"data row {number}: unknown failureType {name!r} (known: "
                               f"{', '.join(WM811K_LABELS)})", lot_id, wafer_id)
    return name


def _parse_wafer_map(value: Any, path: Path, number: int, lot_id: str, wafer_id: str, max_side: int) -> np.ndarray:
    try:
        grid = np.asarray(json.loads(value) if isinstance(value, str) else value)
    except (ValueError, TypeError) as error:  # JSONDecodeError is a ValueError; ragged rows too
        raise WaferError(path, f"data row {number}: unparsable waferMap ({error})", lot_id, wafer_id) from None
    if grid.dtype == object or grid.dtype.kind in "USV":
        raise WaferError(path, f"data row {number}: unparsable waferMap (not a grid of integers)", lot_id, wafer_id)
    _check_side_limit(grid.shape, max_side, path, lot_id, wafer_id)
    return grid


def _wm811k_fields(wafer: Wafer, target: Path) -> tuple[float, str | None]:
    """waferIndex and failureType of a wafer; WaferError when WM-811K cannot hold its ids or label."""
    if not wafer.wafer_id.isdigit() or str(int(wafer.wafer_id)) != wafer.wafer_id:
        raise WaferError(target, "WM-811K needs a wafer_id that is a plain integer (its waferIndex)",
                         wafer.lot_id, wafer.wafer_id)
    if wafer.label is not None and wafer.label not in WM811K_LABELS:
        raise WaferError(target, f"label {wafer.label!r} is not a single WM-811K failureType (one of "
                                 f"{', '.join(WM811K_LABELS)})", wafer.lot_id, wafer.wafer_id)
    return float(int(wafer.wafer_id)), wafer.label


def _nested(name: str | None, as_text: bool) -> Any:
    """WM-811K's [[name]] cell, or its empty form when there is no name."""
    if as_text:
        return "[]" if name is None else f"[[{name}]]"
    return np.zeros((0, 0)) if name is None else np.array([[name]])


def _object_column(values: list[Any]) -> np.ndarray:
    """An object array holding the values as they are (NumPy would stack equal-shaped arrays)."""
    column = np.empty(len(values), dtype=object)
    for position, value in enumerate(values):
        column[position] = value
    return column


def _wm811k_frame(wafers: list[Wafer], target: Path, *, as_text: bool, first_index: int) -> pd.DataFrame:
    """Wafers laid out like LSWMD: object cells, [[name]] label cells (text for the CSV form)."""
    fields = [_wm811k_fields(wafer, target) for wafer in wafers]
    columns = {
        "waferMap": _object_column([json.dumps(w.map.tolist()) if as_text else w.map.copy() for w in wafers]),
        "dieSize": np.array([wafer.n_dies for wafer in wafers], dtype=float),
        "lotName": _object_column([wafer.lot_id for wafer in wafers]),
        "waferIndex": np.array([index for index, _ in fields], dtype=float),
        "trianTestLabel": _object_column(
            [_nested(None if name is None else WM811K_TRAINING, as_text) for _, name in fields]
        ),
        "failureType": _object_column([_nested(name, as_text) for _, name in fields]),
    }
    return pd.DataFrame(columns, index=pd.RangeIndex(first_index, first_index + len(wafers)))


def _warn_dropped_masks(wafers: list[Wafer], target: Path) -> None:
    masked = sum(wafer.mask is not None for wafer in wafers)
    if masked:
        log.warning("%s: WM-811K holds wafer-level labels only; %d masks are not written", target, masked)


# --- writing helpers -------------------------------------------------------------------------


def _unique_wafers(wafers: Iterable[Wafer], target: Path) -> list[Wafer]:
    wafers = list(wafers)
    seen: set[tuple[str, str]] = set()
    for wafer in wafers:
        key = (wafer.lot_id, wafer.wafer_id)
        if key in seen:
            raise WaferError(target, "the wafer appears twice in the input", *key)
        seen.add(key)
    return wafers


STAGING_PREFIX, ASIDE_PREFIX = ".tmp-", ".old-"
_RENAME_EXCHANGE, _AT_FDCWD = 2, -100  # linux/fs.h, fcntl.h
_EXCHANGE_UNSUPPORTED = (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV)


def staging_directory(target: Path) -> Path:
    """A fresh hidden sibling of `target` to build it in (same file system: it can replace target by a rename)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{target.name}-", dir=target.parent))


def _siblings(target: Path, prefix: str) -> list[Path]:
    return sorted(target.parent.glob(f"{prefix}{glob.escape(target.name)}-{'?' * 8}"))  # mkdtemp/token: 8 chars


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


@contextmanager
def _atomic_target(path: Path) -> Iterator[Path]:
    """A hidden temporary sibling to write; it replaces `path` only once the writer has finished."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
