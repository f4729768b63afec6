"""Die tables: one row per die, `lot_id, wafer_id, row, col, bin` (+ `label`, `map_rows`, `map_cols`), as
`.csv` or `.parquet`.

The table is read straight into Arrow and grouped by wafer with NumPy (never per die); its size is checked
first, from the Parquet footer or the CSV file's length. Each bad wafer is one WaferError; the others are
read."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from pipeline.atomic import atomic_file
from pipeline.io.common import (
    CSV_SUFFIX,
    PARQUET_SUFFIX,
    Item,
    PathLike,
    _check_table_bytes,
    _csv_header,
    _require_columns,
    _unique_wafers,
    parquet_column_bytes,
)
from pipeline.wafer import FAIL, NUM_CLASSES, PASS, Wafer, WaferError, validate_wafer

log = logging.getLogger(__name__)

ID_COLUMNS = ("lot_id", "wafer_id")
DIE_TABLE_COLUMNS = (*ID_COLUMNS, "row", "col", "bin")
LABEL_COLUMN = "label"
SHAPE_COLUMNS = ("map_rows", "map_cols")
NUMBER_PATTERN = r"^\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*$"  # text a die table may hold for a number


def write_die_table(wafers: Iterable[Wafer], path: PathLike) -> None:
    """One row per on-wafer die; `label` when any wafer has a mask (null for the others);
    `map_rows`/`map_cols` so that trailing off-wafer rows and columns survive the round trip."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (CSV_SUFFIX, PARQUET_SUFFIX):
        raise WaferError(path, f"a die table is written as .csv or .parquet, not {suffix or '(no suffix)'!r}")
    wafers = _unique_wafers(wafers, path)
    table = _die_table_of(wafers)
    with atomic_file(path) as tmp:
        if suffix == PARQUET_SUFFIX:
            pq.write_table(table, str(tmp))
        else:
            pa_csv.write_csv(table, str(tmp))
    log.info("wrote %d wafers, %d dies to die table %s", len(wafers), table.num_rows, path)


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
