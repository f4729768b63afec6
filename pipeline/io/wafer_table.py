"""Wafer tables: one Parquet row per wafer, `wafer_id, rows, cols, map` (+ `lot_id`, `failure_type`).

The compact form of large labelled sets (49,620 WM-811K wafers, 27,158 MixedWM38 ones): `map` holds the
`rows*cols` bytes of the map, row-major, 0 off-wafer, 1 pass, 2 fail. Without `lot_id`, consecutive wafers
form lots of `wafers_per_lot`, named `<file stem>-<NNNNN>`. `failure_type` is the wafer-level label as the
source wrote it (a WM-811K failureType, MixedWM38 patterns joined by '+', or `none`); it becomes
`Wafer.label`, normalised by `pipeline.labels.normalise_label`.

The reader goes through the file in record batches, so that a large set is never held twice, and checks
each row's shape and length before it decodes the map: a map over the size limit is refused from its
`rows`/`cols` alone.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.atomic import atomic_file
from pipeline.io.common import (
    DEFAULT_LOT_WAFERS,
    MAX_MAP_SIDE,
    PARQUET_SUFFIX,
    Item,
    PathLike,
    _check_table_bytes,
    _require_columns,
    _side_limit_problem,
    _unique_wafers,
    _warn_dropped_masks,
    parquet_column_bytes,
)
from pipeline.labels import normalise_label
from pipeline.wafer import Wafer, WaferError, validate_wafer

__all__ = ["DEFAULT_LOT_WAFERS", "WAFER_TABLE_COLUMNS", "is_wafer_table", "read_wafer_table", "write_wafer_table"]

log = logging.getLogger(__name__)

WAFER_TABLE_COLUMNS = ("wafer_id", "rows", "cols", "map")
LOT_COLUMN, FAILURE_TYPE_COLUMN = "lot_id", "failure_type"
_OWN_COLUMNS = frozenset(("map", "rows", "cols"))  # a die table has none of these
_DIE_COLUMNS = frozenset(("row", "col", "bin"))
BATCH_ROWS = 1024  # rows read (and written, per row group) at a time


def is_wafer_table(column_names: Iterable[str]) -> bool:
    """Whether a Parquet file with these columns is a wafer table rather than a die table. One with only
    some of `map`, `rows`, `cols` still counts, so that its reader says which one is missing."""
    names = set(column_names)
    return bool(names & _OWN_COLUMNS) and not names & _DIE_COLUMNS


def read_wafer_table(path: PathLike, max_map_side: int = MAX_MAP_SIDE,
                     wafers_per_lot: int = DEFAULT_LOT_WAFERS) -> Iterator[Item]:
    """Lenient, like io's readers: each wafer, or a WaferError for each bad row; a file that cannot be read
    as a whole (bad columns, no rows, corrupt) is one WaferError naming the file, and ends the stream."""
    if wafers_per_lot < 1:
        raise ValueError(f"wafers_per_lot must be at least 1, got {wafers_per_lot}")
    path = Path(path)
    try:
        parquet = _open(path)
    except WaferError as error:
        yield error
        return
    columns = [name for name in (LOT_COLUMN, *WAFER_TABLE_COLUMNS, FAILURE_TYPE_COLUMN)
               if name in parquet.schema_arrow.names]
    first_row_of: dict[tuple[str, str], int] = {}
    number = 0
    with parquet:
        try:
            for batch in parquet.iter_batches(batch_size=BATCH_ROWS, columns=columns):
                yield from _batch_items(batch, number, path, max_map_side, wafers_per_lot, first_row_of)
                number += batch.num_rows
        except (OSError, pa.ArrowException) as error:  # the rest of the file could not be read
            yield WaferError(path, f"unreadable wafer table from table row {number} on ({error})")


def write_wafer_table(wafers: Iterable[Wafer], path: PathLike) -> None:
    """One row per wafer, `lot_id` always (so lots survive the round trip); `failure_type` from `Wafer.label`
    when any wafer has one (null for the others). Masks are not written: a wafer table holds none."""
    path = Path(path)
    if path.suffix.lower() != PARQUET_SUFFIX:
        raise WaferError(path, f"a wafer table is written as .parquet, not {path.suffix or '(no suffix)'!r}")
    wafers = _unique_wafers(wafers, path)
    _warn_dropped_masks(wafers, path)
    labels = [None if wafer.label is None else _failure_type(wafer, path) for wafer in wafers]
    schema = _schema(labelled=any(label is not None for label in labels))
    with atomic_file(path) as tmp, pq.ParquetWriter(str(tmp), schema) as writer:
        for start in range(0, len(wafers), BATCH_ROWS):
            part = slice(start, start + BATCH_ROWS)
            writer.write_table(_table_of(wafers[part], labels[part], schema))
    log.info("wrote %d wafers to wafer table %s", len(wafers), path)


# --- reading ---------------------------------------------------------------------------------------


def _open(path: Path) -> pq.ParquetFile:
    """The file, once its metadata says it is a wafer table with rows of a readable size: nothing of the maps
    is read yet."""
    try:
        parquet = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as error:
        raise WaferError(path, f"unreadable wafer table ({error})") from None
    schema = parquet.schema_arrow
    _require_columns(schema.names, WAFER_TABLE_COLUMNS, path)
    kinds = {"wafer_id": (_is_text_or_integer, "text or integers"), "rows": (_is_number, "integers"),
             "cols": (_is_number, "integers"), "map": (_is_bytes, "bytes (binary)"),
             LOT_COLUMN: (_is_text_or_integer, "text or integers"),
             FAILURE_TYPE_COLUMN: (_is_text_or_null, "text")}
    for name, (accepts, wanted) in kinds.items():
        if name in schema.names and not accepts(schema.field(name).type):
            raise WaferError(path, f"column {name!r} has type {schema.field(name).type}; {wanted} are required")
    if parquet.metadata.num_rows == 0:
        raise WaferError(path, "no wafers: the table has its columns but no rows")
    # read a row group at a time: the largest one bounds the memory (a compressed map column can expand a lot)
    _check_table_bytes(path, max(parquet_column_bytes(parquet.metadata, schema.names)),
                       "a row group of the wafer table (uncompressed)")
    return parquet


def _is_text_or_integer(kind: pa.DataType) -> bool:
    return pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_integer(kind)


def _is_text_or_null(kind: pa.DataType) -> bool:
    return pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind)


def _is_number(kind: pa.DataType) -> bool:
    return pa.types.is_integer(kind) or pa.types.is_floating(kind)


def _is_bytes(kind: pa.DataType) -> bool:
    return pa.types.is_binary(kind) or pa.types.is_large_binary(kind)


def _batch_items(batch: pa.RecordBatch, first: int, path: Path, max_side: int, wafers_per_lot: int,
                 first_row_of: dict[tuple[str, str], int]) -> Iterator[Item]:
    """The items of one batch; per-row fields come out as Python values, maps stay in Arrow until needed."""
    names = batch.schema.names

    def values(name: str) -> list:
        if name not in names:
            return [None] * batch.num_rows
        column = batch.column(name)
        return (column.cast(pa.string()) if pa.types.is_integer(column.type) else column).to_pylist()

    lot_ids = values(LOT_COLUMN) if LOT_COLUMN in names else \
        [f"{path.stem}-{(first + i) // wafers_per_lot:05d}" for i in range(batch.num_rows)]
    maps = batch.column("map")
    lengths = pc.binary_length(maps).to_pylist()
    fields = zip(lot_ids, values("wafer_id"), values("rows"), values("cols"), lengths, values(FAILURE_TYPE_COLUMN))
    for index, (lot_id, wafer_id, rows, cols, length, failure_type) in enumerate(fields):
        number = first + index
        try:
            if lot_id is not None and wafer_id is not None:  # a repeat is caught even when either row is bad
                previous = first_row_of.setdefault((lot_id, wafer_id), number)
                if previous != number:
                    raise WaferError(path, f"table row {number} repeats the wafer of table row {previous}",
                                     lot_id, wafer_id)
            shape = _checked_shape(path, number, lot_id, wafer_id, rows, cols, length, max_side)
            label = _label(failure_type, path, lot_id, wafer_id)
            grid = np.frombuffer(maps[index].as_buffer(), dtype=np.uint8).reshape(shape).copy()
            yield validate_wafer(lot_id, wafer_id, grid, source=path, label=label)
        except WaferError as error:
            yield error


def _checked_shape(path: Path, number: int, lot_id: str | None, wafer_id: str | None, rows: object,
                   cols: object, length: int | None, max_side: int) -> tuple[int, int]:
    """(rows, cols) once they are whole, positive, within the limit and match the map's length."""
    fields = {LOT_COLUMN: lot_id, "wafer_id": wafer_id, "rows": rows, "cols": cols, "map": length}
    nulls = [name for name, value in fields.items() if value is None]
    if nulls:
        raise WaferError(path, f"table row {number}: null {', '.join(nulls)}", lot_id, wafer_id)
    if not all(float(value).is_integer() for value in (rows, cols)):  # a float column can hold 2.5 or nan
        raise WaferError(path, f"table row {number}: rows x cols {rows} x {cols} are not whole numbers",
                         lot_id, wafer_id)
    shape = (int(rows), int(cols))
    if min(shape) < 1:
        raise WaferError(path, f"table row {number}: rows x cols {shape[0]} x {shape[1]} is not a map shape",
                         lot_id, wafer_id)
    if problem := _side_limit_problem(shape, max_side):
        raise WaferError(path, f"table row {number}: {problem}", lot_id, wafer_id)
    if length != shape[0] * shape[1]:
        raise WaferError(path, f"table row {number}: map holds {length} bytes; rows x cols {shape[0]} x "
                               f"{shape[1]} needs {shape[0] * shape[1]}", lot_id, wafer_id)
    return shape


def _label(failure_type: str | None, path: Path, lot_id: str, wafer_id: str) -> str | None:
    if failure_type is None:
        return None  # an unlabelled wafer
    try:
        return normalise_label(failure_type)
    except ValueError as error:
        raise WaferError(path, f"bad failure_type: {error}", lot_id, wafer_id) from None


# --- writing ---------------------------------------------------------------------------------------


def _failure_type(wafer: Wafer, target: Path) -> str:
    try:
        return normalise_label(wafer.label)
    except ValueError as error:
        raise WaferError(target, f"a wafer table cannot hold this label: {error}", wafer.lot_id,
                         wafer.wafer_id) from None


def _schema(labelled: bool) -> pa.Schema:
    fields = [(LOT_COLUMN, pa.string()), ("wafer_id", pa.string()), ("rows", pa.int32()), ("cols", pa.int32()),
              ("map", pa.binary())]
    return pa.schema([*fields, *([(FAILURE_TYPE_COLUMN, pa.string())] if labelled else [])])


def _table_of(wafers: list[Wafer], labels: list[str | None], schema: pa.Schema) -> pa.Table:
    columns = [
        [wafer.lot_id for wafer in wafers],
        [wafer.wafer_id for wafer in wafers],
        [wafer.shape[0] for wafer in wafers],
        [wafer.shape[1] for wafer in wafers],
        [wafer.map.tobytes() for wafer in wafers],
        labels,
    ]
    return pa.table(columns[: len(schema)], schema=schema)
