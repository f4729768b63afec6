"""Property tests of the readers: whatever a file holds, a reader yields valid Wafers or Rejected records
(or raises WaferError), never another exception, and it yields exactly the wafers the input describes."""

from __future__ import annotations

import csv
import string
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from pipeline import io
from pipeline.io import Rejected
from pipeline.wafer import NUM_CLASSES, Wafer, WaferError

FUZZ = settings(max_examples=150, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
pytestmark = [pytest.mark.slow,  # hypothesis: hundreds of files per property
              pytest.mark.timeout(120)]  # a reader that hangs fails here

DTYPES = ["u1", "i1", "u2", "i2", "i4", "i8", "u8", ">i4", "f2", "f4", "f8", "?", "c8", "M8[s]", "m8[s]", "U2", "S2"]
SHAPES = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=6)


@st.composite
def any_array(draw) -> np.ndarray:
    """Arrays of many dtypes and shapes; integer ones often hold only 0..2 so that valid maps come up."""
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    small = dtype.kind in "iu" and draw(st.booleans())
    elements = st.integers(0, 2) if small else None
    return draw(hnp.arrays(dtype, SHAPES, elements=elements))


def _is_valid_map(array: np.ndarray) -> bool:
    return (array.ndim == 2 and array.size > 0 and array.dtype.kind in "iu"
            and bool(((array >= 0) & (array <= 2)).all()) and bool((array != 0).any()))


def _check(item: Wafer | Rejected) -> None:
    """A Wafer is valid by the contract; a Rejected says why, naming its source."""
    if isinstance(item, Wafer):
        assert item.map.dtype == np.uint8 and item.map.ndim == 2 and item.map.size
        assert set(np.unique(item.map)) <= {0, 1, 2} and item.n_dies > 0
        if item.mask is not None:
            assert item.mask.shape == item.map.shape and int(item.mask.max()) < NUM_CLASSES
            assert not item.mask[item.map == 0].any()
    else:
        assert isinstance(item, Rejected) and item.reason.startswith(item.source) and item.reason


def _read(path: Path) -> list[Wafer | Rejected]:
    """Every item of a source; a source that cannot be opened at all must say so with a WaferError."""
    try:
        items = list(io.iter_source(path))
    except WaferError as error:
        assert str(error).startswith(str(path))
        return []
    for item in items:
        _check(item)
    return items


@FUZZ
@given(array=any_array(), as_object=st.booleans())
def test_any_npy_array_is_a_valid_wafer_or_one_rejection(array, as_object):
    with tempfile.TemporaryDirectory() as root:
        lot = Path(root) / "LOT"
        lot.mkdir()
        if as_object:  # plain Python ints inside a pickle: never unpickled, always refused
            array = array.astype(object)
        np.save(lot / "w.npy", array, allow_pickle=as_object)
        (item,) = _read(lot)
        assert isinstance(item, Wafer) == (not as_object and _is_valid_map(array)), getattr(item, "reason", "")
        if isinstance(item, Wafer):
            np.testing.assert_array_equal(item.map, array)


@FUZZ
@given(wafer_map=hnp.arrays(np.uint8, (5, 6), elements=st.integers(0, 2)), mask=any_array())
def test_any_mask_beside_a_map_is_accepted_only_when_it_fits_it(wafer_map, mask):
    with tempfile.TemporaryDirectory() as root:
        lot = Path(root) / "LOT"
        lot.mkdir()
        np.save(lot / "w.npy", wafer_map)
        np.save(lot / "w.mask.npy", mask)
        (item,) = _read(lot)
        fits = (_is_valid_map(wafer_map) and mask.shape == wafer_map.shape and mask.dtype.kind in "iu"
                and bool(((mask >= 0) & (mask < NUM_CLASSES)).all()) and not mask[wafer_map == 0].any())
        assert isinstance(item, Wafer) == fits, getattr(item, "reason", "")


PREFIXES = [b"", b"\x93NUMPY\x01\x00", b"\x93NUMPY\x02\x00", b"PAR1", b"lot_id,wafer_id,row,col,bin\n",
            b"lot_id\twafer_id\trow\tcol\tbin\tlabel\n", b"\twaferMap\tlotName\twaferIndex\n"]


@FUZZ
@given(prefix=st.sampled_from(PREFIXES), body=st.binary(max_size=600), suffix=st.sampled_from([".csv", ".parquet"]))
def test_any_bytes_as_a_die_table_or_wm811k_file(prefix, body, suffix):
    with tempfile.TemporaryDirectory() as root:
        path = Path(root) / f"input{suffix}"
        path.write_bytes(prefix + body)
        _read(path)


@FUZZ
@given(prefix=st.sampled_from(PREFIXES[:3]), body=st.binary(max_size=600))
def test_any_bytes_as_an_npy_wafer_are_one_rejection_or_a_wafer(prefix, body):
    with tempfile.TemporaryDirectory() as root:
        lot = Path(root) / "LOT"
        lot.mkdir()
        (lot / "w.npy").write_bytes(prefix + body)
        (item,) = _read(lot)


@FUZZ
@given(header=st.fixed_dictionaries({
    "descr": st.sampled_from(["|u1", "<i8", "|O", "<U3", "|V4", "<f8", "bogus", "|b1", "<M8[s]"]),
    "fortran_order": st.booleans(),
    "shape": st.lists(st.integers(0, 5000), max_size=3).map(tuple)}), data=st.binary(max_size=256))
def test_any_npy_header_is_checked_before_the_data_is_read(header, data):
    with tempfile.TemporaryDirectory() as root:
        lot = Path(root) / "LOT"
        lot.mkdir()
        text = repr(header).encode("latin1")
        padding = 64 - (10 + len(text) + 1) % 64
        (lot / "w.npy").write_bytes(b"\x93NUMPY\x01\x00" + (len(text) + padding + 1).to_bytes(2, "little")
                                    + text + b" " * padding + b"\n" + data)
        (item,) = _read(lot)


# --- die tables ----------------------------------------------------------------------------------------------

IDS = st.text(alphabet=string.ascii_letters + string.digits + "-_ .</>é\\", min_size=0, max_size=4)
NUMBER_CELLS = {  # (cells, Arrow type of the column in Parquet)
    "int": (st.integers(-3, 8), pa.int64()),
    "float": (st.one_of(st.integers(-3, 8).map(float), st.floats(width=32)), pa.float64()),
    "text": (st.one_of(st.integers(-3, 8).map(str), st.sampled_from(["x", "", " 1 ", "1.0", "2e0", "nan", "é"])),
             pa.string()),
}


@st.composite
def die_table(draw) -> tuple[dict[str, list], dict[str, pa.DataType]]:
    """Dies of a few wafers as columns: each numeric column of one random type, cells sometimes null."""
    n = draw(st.integers(1, 30))
    columns = {"lot_id": draw(st.lists(st.sampled_from(["L1", "L2"]) | IDS, min_size=n, max_size=n)),
               "wafer_id": draw(st.lists(st.sampled_from(["w1", "w2"]) | IDS, min_size=n, max_size=n))}
    types = {"lot_id": pa.string(), "wafer_id": pa.string()}
    for name in ["row", "col", "bin"] + (["label"] if draw(st.booleans()) else []):
        cells, types[name] = NUMBER_CELLS[draw(st.sampled_from(sorted(NUMBER_CELLS)))]
        columns[name] = draw(st.lists(st.none() | cells, min_size=n, max_size=n))
    return columns, types


def _write(columns: dict[str, list], types: dict[str, pa.DataType], path: Path, encoding: str) -> None:
    """CSV text, or Parquet with ids as bytes, in `encoding` (latin-1: a file from another system)."""
    if path.suffix == ".csv":
        rows = zip(*columns.values())
        with open(path, "w", newline="", encoding=encoding) as file:
            csv.writer(file).writerows([list(columns), *([("" if v is None else v) for v in row] for row in rows)])
        return
    arrays = {name: pa.array([v.encode(encoding) for v in values], pa.binary()) if name in io.ID_COLUMNS
              else pa.array(values, types[name]) for name, values in columns.items()}
    pq.write_table(pa.table(arrays), path)


@FUZZ
@given(table=die_table(), suffix=st.sampled_from([".csv", ".parquet"]), encoding=st.sampled_from(["utf-8", "latin-1"]))
def test_any_die_table_yields_one_item_per_wafer_it_describes(table, suffix, encoding):
    columns, types = table
    with tempfile.TemporaryDirectory() as root:
        path = Path(root) / f"dies{suffix}"
        _write(columns, types, path, encoding)
        items = _read(path)
        keys = list(zip(columns["lot_id"], columns["wafer_id"]))
        whole_file = len(items) == 1 and isinstance(items[0], Rejected) and items[0].wafer_id is None
        if not whole_file:  # one item per (lot, wafer): nothing lost, nothing invented
            assert len(items) == len(set(keys))
            if encoding == "utf-8":
                assert sorted((item.lot_id, item.wafer_id) for item in items) == sorted(set(keys))
        for wafer in (item for item in items if isinstance(item, Wafer)):
            bins = [b for key, b in zip(keys, columns["bin"]) if key == (wafer.lot_id, wafer.wafer_id)]
            assert wafer.n_dies == len(bins)
            assert wafer.n_fail == sum(float(b) == 2 for b in bins)
