"""Wafer tables (pipeline/io/wafer_table.py): round trips, slices of the real WM-811K and MixedWM38 tables, and
one test per bad input asserting that the error names the file, the wafer and the problem."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import io
from pipeline.io import Rejected, wafer_table
from pipeline.labels import normalise_label
from pipeline.wafer import Wafer, WaferError, validate_wafer
from pipeline.io.wafer_table import DEFAULT_LOT_WAFERS, read_wafer_table, write_wafer_table

REAL = Path(__file__).resolve().parents[1] / "real_data"
REAL_TABLES = [REAL / "wm811k" / "wm811k_labelled.parquet", REAL / "mixedwm38" / "mixedwm38.parquet"]
LABELS = ["Edge-Loc", "Scratch+Center", "none", None, "Near-full"]


def make_wafer(lot: str, wafer: str, *, seed: int = 0, label: str | None = None, mask: bool = False,
               rows: int = 9, cols: int = 11) -> Wafer:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:rows, :cols]
    on = ((yy - (rows - 1) / 2) / (rows / 2)) ** 2 + ((xx - (cols - 1) / 2) / (cols / 2)) ** 2 <= 1
    grid = np.where(on, rng.choice([1, 2], size=(rows, cols), p=[0.8, 0.2]), 0)
    labels = np.where(grid == 2, 1, 0) if mask else None
    return validate_wafer(lot, wafer, grid, labels, label=label)


def wafers() -> list[Wafer]:
    return [make_wafer("lotA" if i < 3 else "lotB", f"w{i}", seed=i, label=label, rows=9 + i, cols=14 - i)
            for i, label in enumerate(LABELS)]


def assert_same(read: list[Wafer], written: list[Wafer]) -> None:
    assert [(w.lot_id, w.wafer_id) for w in read] == [(w.lot_id, w.wafer_id) for w in written]
    for got, want in zip(read, written):
        assert got.map.dtype == np.uint8 and got.map.flags.writeable
        np.testing.assert_array_equal(got.map, want.map)
        assert got.label == (None if want.label is None else normalise_label(want.label))
        assert got.mask is None


def assert_names(message: str, path: Path, wafer: str | None, problem: str) -> None:
    assert str(path) in message, message
    if wafer is not None:
        assert f"wafer {wafer}" in message, message
    assert re.search(problem, message), message


# --- round trips -----------------------------------------------------------------------------------


def test_round_trip_keeps_maps_ids_lots_and_normalised_labels(tmp_path, caplog):
    written = [*wafers(), make_wafer("lotB", "masked", seed=9, mask=True)]
    path = tmp_path / "wafers.parquet"
    write_wafer_table(written, path)

    assert io.source_kind(path) == io.WAFER_TABLE
    assert_same(list(read_wafer_table(path)), written)
    assert_same(io.read_wafers(path), written)
    assert pq.read_schema(path).names == ["lot_id", "wafer_id", "rows", "cols", "map", "failure_type"]
    assert io.read_wafers(path)[1].label == "Center+Scratch"  # MixedWM38 order
    assert "1 masks are not written" in caplog.text
    assert [p.name for p in tmp_path.iterdir()] == ["wafers.parquet"]  # no temporary left


def test_unlabelled_wafers_are_written_without_failure_type(tmp_path):
    path = tmp_path / "wafers.parquet"
    write_wafer_table([make_wafer("lot1", "1"), make_wafer("lot1", "2", seed=1)], path)

    assert "failure_type" not in pq.read_schema(path).names
    assert [w.label for w in io.read_wafers(path)] == [None, None]


def test_without_lot_id_consecutive_wafers_form_lots(tmp_path):
    written = [make_wafer("x", f"w{i:02d}", seed=i) for i in range(DEFAULT_LOT_WAFERS + 3)]
    path = tmp_path / "batch7.parquet"
    write_wafer_table(written, path)
    pq.write_table(pq.read_table(path).drop_columns(["lot_id"]), path)

    default = io.read_wafers(path)
    assert [w.lot_id for w in default] == ["batch7-00000"] * DEFAULT_LOT_WAFERS + ["batch7-00001"] * 3
    by_ten = [w.lot_id for w in io.iter_source(path, wafers_per_lot=10)]
    assert by_ten == ["batch7-00000"] * 10 + ["batch7-00001"] * 10 + ["batch7-00002"] * 8
    assert [w.wafer_id for w in default] == [w.wafer_id for w in written]


def test_reading_goes_by_record_batches(tmp_path, monkeypatch):
    """A large set is never read whole: the reader asks for batches of BATCH_ROWS rows."""
    monkeypatch.setattr(wafer_table, "BATCH_ROWS", 4)
    written = [make_wafer("lot1", f"w{i}", seed=i) for i in range(10)]
    path = tmp_path / "wafers.parquet"
    write_wafer_table(written, path)
    batches = []
    real = pq.ParquetFile.iter_batches

    def spy(self, *args, **kwargs):
        for batch in real(self, *args, **kwargs):
            batches.append(batch.num_rows)
            yield batch

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    assert_same(list(read_wafer_table(path)), written)
    assert batches == [4, 4, 2]
    assert pq.ParquetFile(path).metadata.num_row_groups == 3


def test_writer_refuses_what_a_wafer_table_cannot_hold(tmp_path):
    with pytest.raises(WaferError, match=r"written as \.parquet, not '\.csv'"):
        write_wafer_table([make_wafer("lot1", "1")], tmp_path / "wafers.csv")
    with pytest.raises(WaferError, match=r"wafer lot1/1: a wafer table cannot hold this label: label 'ring'"):
        write_wafer_table([make_wafer("lot1", "1", label="ring")], tmp_path / "wafers.parquet")
    with pytest.raises(WaferError, match=r"wafer lot1/1: the wafer appears twice"):
        write_wafer_table([make_wafer("lot1", "1")] * 2, tmp_path / "wafers.parquet")
    assert list(tmp_path.iterdir()) == []


# --- the real tables -------------------------------------------------------------------------------


@pytest.mark.parametrize("source", REAL_TABLES, ids=lambda path: path.parent.name)
def test_a_slice_of_a_real_table_gives_validated_wafers_with_normalised_labels(tmp_path, source):
    if not source.is_file():
        pytest.skip(f"{source} not found")
    whole = pq.read_table(source)
    table = whole.take(np.linspace(0, whole.num_rows - 1, 200).astype(np.int64))  # spread over the file
    path = tmp_path / "slice.parquet"
    pq.write_table(table, path)

    read = io.read_wafers(path)
    assert len(read) == 200
    assert [w.wafer_id for w in read] == table.column("wafer_id").to_pylist()
    assert [w.lot_id for w in read[:26]] == ["slice-00000"] * 25 + ["slice-00001"]
    assert [w.label for w in read] == [normalise_label(t) for t in table.column("failure_type").to_pylist()]
    assert len({w.label for w in read}) > 3
    for wafer, rows, cols, data in zip(read, *(table.column(c).to_pylist() for c in ("rows", "cols", "map"))):
        assert wafer.shape == (rows, cols) and wafer.n_dies > 0
        np.testing.assert_array_equal(wafer.map, np.frombuffer(data, np.uint8).reshape(rows, cols))


# --- bad inputs ------------------------------------------------------------------------------------


def good_rows() -> dict[str, list]:
    good = wafers()[:3]
    return {"lot_id": [w.lot_id for w in good], "wafer_id": [w.wafer_id for w in good],
            "rows": [w.shape[0] for w in good], "cols": [w.shape[1] for w in good],
            "map": [w.map.tobytes() for w in good], "failure_type": ["Loc", "none", None]}


def with_bad_row(**bad: object) -> Callable[[dict], dict]:
    """A fourth row, wafer lotA/bad, made from a good one with the fields in `bad`."""
    def spoil(columns: dict) -> dict:
        wafer = make_wafer("lotA", "bad", seed=7)
        row = {"lot_id": "lotA", "wafer_id": "bad", "rows": wafer.shape[0], "cols": wafer.shape[1],
               "map": wafer.map.tobytes(), "failure_type": "Scratch", **bad}
        return {name: [*values, row[name]] for name, values in columns.items()}
    return spoil


GOOD_MAP = make_wafer("lotA", "bad", seed=7).map
BAD_ROWS = {
    "map_wrong_length": (with_bad_row(map=GOOD_MAP.tobytes()[:-1]),
                         r"table row 3: map holds 98 bytes; rows x cols 9 x 11 needs 99"),
    "value_3": (with_bad_row(map=np.where(GOOD_MAP == 2, 3, GOOD_MAP).astype(np.uint8).tobytes()),
                r"map holds values \[3\] outside \{0, 1, 2\}"),
    "null_map": (with_bad_row(map=None), r"table row 3: null map"),
    "over_side_limit": (with_bad_row(rows=5000, cols=5000, map=b"\x01"),
                        r"table row 3: map shape \(5000, 5000\) exceeds the limit of 4096 dies per side"),
    "bad_failure_type": (with_bad_row(failure_type="Edge-Loc+Bogus"),
                         r"bad failure_type: label 'Edge-Loc\+Bogus': unknown pattern\(s\) \['Bogus'\]"),
    "zero_rows": (with_bad_row(rows=0, map=b""), r"table row 3: rows x cols 0 x 11 is not a map shape"),
    "unsafe_wafer_id": (with_bad_row(wafer_id="../bad"), r"wafer_id '\.\./bad' starts with '\.'"),
}


@pytest.mark.parametrize("case", BAD_ROWS)
def test_a_bad_row_is_rejected_alone_naming_file_and_wafer(tmp_path, case):
    spoil, problem = BAD_ROWS[case]
    path = tmp_path / "wafers.parquet"
    pq.write_table(pa.table(spoil(good_rows())), path)
    wafer = "lotA/../bad" if case == "unsafe_wafer_id" else "lotA/bad"

    items = list(io.iter_source(path))
    assert [type(item) for item in items] == [Wafer, Wafer, Wafer, Rejected]
    assert [w.label for w in items[:3]] == ["Loc", "none", None]
    assert_names(items[3].reason, path, wafer, problem)
    with pytest.raises(WaferError) as caught:
        io.read_wafers(path)
    assert_names(str(caught.value), path, wafer, problem)


def test_a_map_over_the_limit_is_refused_from_rows_and_cols_without_decoding(tmp_path, monkeypatch):
    path = tmp_path / "wafers.parquet"
    pq.write_table(pa.table(with_bad_row(rows=3000, cols=3000, map=bytes(3000 * 3000))(good_rows())), path)
    decoded = []
    real = np.frombuffer

    def frombuffer(data, *args, **kwargs):
        decoded.append(len(data))
        return real(data, *args, **kwargs)

    monkeypatch.setattr(wafer_table.np, "frombuffer", frombuffer)

    items = list(read_wafer_table(path, max_map_side=2048))
    assert_names(str(items[3]), path, "lotA/bad", r"map shape \(3000, 3000\) exceeds the limit of 2048 dies per side")
    assert len(decoded) == 3 and max(decoded) < 3000 * 3000


def test_a_repeated_wafer_id_in_a_lot_is_rejected_both_times_it_repeats(tmp_path):
    columns = good_rows()
    columns = {name: values + values[:1] * 2 for name, values in columns.items()}
    path = tmp_path / "wafers.parquet"
    pq.write_table(pa.table(columns), path)

    items = list(read_wafer_table(path))
    assert [type(item) for item in items] == [Wafer, Wafer, Wafer, WaferError, WaferError]
    assert_names(str(items[3]), path, "lotA/w0", r"table row 3 repeats the wafer of table row 0")
    assert_names(str(items[4]), path, "lotA/w0", r"table row 4 repeats the wafer of table row 0")


def test_the_same_wafer_id_in_two_lots_is_two_wafers(tmp_path):
    columns = good_rows()
    columns["lot_id"] = ["lotA", "lotB", "lotC"]
    columns["wafer_id"] = ["w", "w", "w"]
    path = tmp_path / "wafers.parquet"
    pq.write_table(pa.table(columns), path)

    assert [(w.lot_id, w.wafer_id) for w in io.read_wafers(path)] == [("lotA", "w"), ("lotB", "w"), ("lotC", "w")]


def _drop(name: str) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        columns = good_rows()
        del columns[name]
        pq.write_table(pa.table(columns), path)
    return write


def _as_text(name: str) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        columns = good_rows()
        columns[name] = [str(value) for value in columns[name]]
        pq.write_table(pa.table(columns), path)
    return write


def _empty(path: Path) -> None:
    pq.write_table(pa.table(good_rows()).slice(0, 0), path)


BAD_FILES = {
    "missing_map": (_drop("map"), r"missing required column\(s\) map"),
    "missing_wafer_id": (_drop("wafer_id"), r"missing required column\(s\) wafer_id"),
    "text_rows": (_as_text("rows"), r"column 'rows' has type string; integers are required"),
    "text_map": (_as_text("map"), r"column 'map' has type string; bytes \(binary\) are required"),
    "empty_table": (_empty, r"no wafers: the table has its columns but no rows"),
    "corrupt_bytes": (lambda path: path.write_bytes(b"PAR1 not a parquet file PAR1"), r"unreadable wafer table"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_a_bad_file_is_one_error_naming_it(tmp_path, case):
    write, problem = BAD_FILES[case]
    path = tmp_path / "wafers.parquet"
    write(path)

    (error,) = read_wafer_table(path)
    assert isinstance(error, WaferError) and (error.lot_id, error.wafer_id) == (None, None)
    assert_names(str(error), path, None, problem)
    if case != "corrupt_bytes":  # a schema that cannot be read says nothing of the kind: the die-table reader has it
        with pytest.raises(WaferError, match=problem):
            io.read_wafers(path)


def test_non_integer_and_null_fields_are_rejected_per_wafer(tmp_path):
    columns = {"wafer_id": ["a", None, "c"], "rows": [3.0, 3.0, 2.5], "cols": [3, 3, 4],
               "map": [bytes([0, 1, 0, 1, 2, 1, 0, 1, 0])] * 2 + [bytes(10)]}
    path = tmp_path / "wafers.parquet"
    pq.write_table(pa.table(columns), path)

    good, null_id, fraction = read_wafer_table(path)
    assert isinstance(good, Wafer) and good.shape == (3, 3) and good.lot_id == "wafers-00000"
    assert_names(str(null_id), path, None, r"lot wafers-00000: table row 1: null wafer_id")
    assert_names(str(fraction), path, "wafers-00000/c", r"table row 2: rows x cols 2\.5 x 4 are not whole numbers")
