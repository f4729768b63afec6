"""What the readers and writers of several formats share: the limits, the problem texts, the `Rejected`
record, and the checks of columns, map sides and table sizes."""

from __future__ import annotations

import csv
import logging
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from pipeline.wafer import Wafer, WaferError

log = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]
Item = Wafer | WaferError

MAX_MAP_SIDE = 4096  # default dies per map side; larger maps are refused before anything is allocated
DEFAULT_LOT_WAFERS = 25  # a wafer table without lot_id: consecutive wafers form lots of this many
MAX_TABLE_BYTES = 4 << 30  # a die table, or a wafer table's row group, larger than this (uncompressed) is refused unread
PICKLE_SUFFIXES = (".pkl", ".pickle")
CSV_SUFFIX, PARQUET_SUFFIX = ".csv", ".parquet"
CSV_HEADER_MAX_BYTES = 1 << 16

PICKLE_PROBLEM = "pickles are only read when named explicitly (a pickle runs code); not opened"
LINK_PROBLEM = "a symbolic link that leads out of its directory; not followed"
EMPTY_FILE = "empty file (0 bytes)"


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


def _leads_outside(entry: Path, directory: Path) -> bool:
    """A symbolic link whose target is not inside `directory`: following it would read what the
    directory does not hold (another lot, or any file the process can open)."""
    if not entry.is_symlink():
        return False
    return not Path(os.path.realpath(entry)).is_relative_to(os.path.realpath(directory))


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


def _unique_wafers(wafers: Iterable[Wafer], target: Path) -> list[Wafer]:
    wafers = list(wafers)
    seen: set[tuple[str, str]] = set()
    for wafer in wafers:
        key = (wafer.lot_id, wafer.wafer_id)
        if key in seen:
            raise WaferError(target, "the wafer appears twice in the input", *key)
        seen.add(key)
    return wafers


def _warn_dropped_masks(wafers: list[Wafer], target: Path) -> None:
    masked = sum(wafer.mask is not None for wafer in wafers)
    if masked:
        log.warning("%s: WM-811K holds wafer-level labels only; %d masks are not written", target, masked)
