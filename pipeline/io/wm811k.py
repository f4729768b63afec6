"""WM-811K: `LSWMD.pkl` (a pandas pickle, old pandas versions included) and its CSV form.

A pickle runs code when loaded: it is only opened when the user names it, and then unpickled with an
allowlist of what an LSWMD DataFrame is made of. `failureType` becomes `Wafer.label`; masks are not held."""

from __future__ import annotations

import codecs
import copyreg
import functools
import json
import logging
import math
import pickle
from collections.abc import Callable, Iterable, Iterator
from itertools import repeat
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
from pandas.compat import pickle_compat

from pipeline.atomic import atomic_file
from pipeline.io.common import (
    Item,
    PathLike,
    _check_side_limit,
    _csv_header,
    _require_columns,
    _unique_wafers,
    _warn_dropped_masks,
)
from pipeline.labels import WM811K_LABELS
from pipeline.wafer import Wafer, WaferError, validate_wafer

log = logging.getLogger(__name__)

WM811K_COLUMNS = ("waferMap", "dieSize", "lotName", "waferIndex", "trianTestLabel", "failureType")
WM811K_REQUIRED = ("waferMap", "lotName", "waferIndex")
WM811K_CSV_SEPARATOR = "\t"
WM811K_CSV_CHUNK_ROWS = 1000
WM811K_TRAINING = "Training"


def write_wm811k_csv(wafers: Iterable[Wafer], path: PathLike) -> None:
    """WM-811K's CSV form (tab-separated, index column first, waferMap as a nested list)."""
    path = Path(path)
    wafers = _unique_wafers(wafers, path)
    _warn_dropped_masks(wafers, path)
    with atomic_file(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as out:
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
    with atomic_file(path) as tmp:
        frame.to_pickle(tmp)
    log.info("wrote %d wafers to WM-811K pickle %s", len(wafers), path)


# --- reading -------------------------------------------------------------------------------------


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


# --- writing -------------------------------------------------------------------------------------


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
