"""The map-size limit: refused before allocation, whatever the file claims, and configurable per call."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline import io
from pipeline.io import Rejected, common, die_table, wafer_table
from pipeline.wafer import Wafer, WaferError, validate_wafer

from .catalogue import good_wafer

SIDE = 5000
ALLOCATION_BUDGET = 2 << 20  # bytes: a refused file may cost a header, never its data


def _sparse_npy(path: Path, shape: tuple[int, ...], descr: object) -> Path:
    """A .npy header and a hole as long as the data it promises: a huge file that takes no disk."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as file:
        np.lib.format.write_array_header_1_0(file, {"descr": descr, "fortran_order": False, "shape": shape})
        file.truncate(file.tell() + int(np.prod(shape)) * np.dtype(np.lib.format.descr_to_dtype(descr)).itemsize)
    return path


def _read_with_peak(path: Path, **limit) -> tuple[list, int]:
    tracemalloc.start()
    try:
        items = list(io.iter_source(path, **limit))
        return items, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_5000_square_map_is_refused_before_its_25_mb_are_allocated(tmp_path):
    path = _sparse_npy(tmp_path / "LOT" / "huge.npy", (SIDE, SIDE), "|u1")
    assert path.stat().st_blocks * 512 < 1 << 20  # sparse: the test itself stays cheap
    (rejected,), peak = _read_with_peak(path.parent)
    assert isinstance(rejected, Rejected) and rejected.wafer_id == "huge"
    assert "map shape (5000, 5000) exceeds the limit of 4096 dies per side" in rejected.reason
    assert peak < ALLOCATION_BUDGET


@pytest.mark.parametrize(("shape", "descr"), [((64, 64), ("|u1", (SIDE,))), ((2048, 2048), "<U4"),
                                             ((2,), [("a", "<i8"), ("b", "<f8")])],
                         ids=["sub-array", "wide-text", "record"])
def test_a_dtype_that_hides_its_size_is_refused_before_allocation(tmp_path, shape, descr):
    """Sub-arrays and wide items multiply the bytes behind a shape that is within the side limit."""
    path = _sparse_npy(tmp_path / "LOT" / "hidden.npy", shape, descr)
    (rejected,), peak = _read_with_peak(path.parent)
    assert "only plain integer arrays are accepted" in rejected.reason
    assert peak < ALLOCATION_BUDGET


def test_the_limit_is_a_parameter_of_the_readers(tmp_path):
    path = _sparse_npy(tmp_path / "LOT" / "huge.npy", (SIDE, SIDE), "|u1")
    (rejected,), _ = _read_with_peak(path.parent, max_map_side=SIDE)
    assert "map has no on-wafer die" in rejected.reason  # past the size check, refused for its content


def _sources(tmp_path: Path, wafer: Wafer) -> dict[str, Path]:
    numbered = validate_wafer(wafer.lot_id, "1", wafer.map)
    io.write_npy_lots([wafer], tmp_path / "lots")
    io.write_die_table([wafer], tmp_path / "dies.parquet")
    io.write_wm811k_csv([numbered], tmp_path / "wm.csv")
    return {"npy": tmp_path / "lots", "die_table": tmp_path / "dies.parquet", "wm811k": tmp_path / "wm.csv"}


@pytest.mark.parametrize("kind", ["npy", "die_table", "wm811k"])
def test_a_lower_limit_refuses_a_map_every_format_accepts_by_default(tmp_path, kind):
    source = _sources(tmp_path, good_wafer("LOT", "w", size=20))[kind]
    assert [w.shape for w in io.read_wafers(source)] == [(20, 20)]
    (rejected,) = io.iter_source(source, max_map_side=16)
    assert isinstance(rejected, Rejected)
    assert "limit of 16 dies per side" in rejected.reason
    with pytest.raises(WaferError, match="limit of 16 dies per side"):
        io.read_wafers(source, max_map_side=16)


def test_a_die_table_with_a_far_die_is_refused_before_its_grid_is_allocated(tmp_path):
    frame = pd.DataFrame({"lot_id": ["L", "L"], "wafer_id": ["w", "w"], "row": [0, 10**12], "col": [0, 10**12],
                          "bin": [1, 2]})
    frame.to_parquet(tmp_path / "dies.parquet")
    (rejected,), peak = _read_with_peak(tmp_path / "dies.parquet")
    assert "beyond the limit of 4096 dies per side" in rejected.reason
    assert peak < ALLOCATION_BUDGET


def test_large_maps_are_predicted_in_smaller_batches():
    """A pixel budget per batch: 64 maps of 64 x 64, but only 5 of 224 x 224, and a huge map alone."""
    from pipeline.predict import bucket_batches

    shapes = [(30, 30)] * 70 + [(200, 200)] * 10 + [(4000, 4000)] * 2
    batches = bucket_batches(shapes, 64, max_pixels=262_144)
    sizes = sorted((shapes[b[0]], len(b)) for b in batches)
    assert sizes == [((30, 30), 6), ((30, 30), 64), ((200, 200), 5), ((200, 200), 5), ((4000, 4000), 1),
                     ((4000, 4000), 1)]
    assert sorted(p for b in batches for p in b) == list(range(len(shapes)))


def test_a_large_map_is_drawn_no_larger_than_the_image_cap(monkeypatch):
    from pipeline import report
    from pipeline.params import ReportParams

    drawn = []
    monkeypatch.setattr(report, "png_data_uri", lambda rgb: drawn.append(rgb.shape) or "data:")
    wafer = validate_wafer("L", "w", np.ones((900, 700), np.uint8))
    large = report.wafer_image(wafer, np.zeros((900, 700), np.uint8), ReportParams(max_image_px=1200))
    small = report.wafer_image(good_wafer("L", "small"), np.zeros((10, 10), np.uint8), ReportParams(max_image_px=1200))
    assert drawn == [(900, 700), (10, 10)]  # the PNG: one pixel a die
    assert 'width="700" height="900"' in large and "url(#" not in large  # shown 1 pixel a die, no gutter: the cap
    assert 'width="50" height="50"' in small and "url(#" in small  # small maps keep die_px 5 and the gutter


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_a_die_table_over_the_byte_limit_is_refused_before_it_is_read(tmp_path, monkeypatch, suffix):
    """A small, highly compressed Parquet file can expand to tens of GB: its footer's uncompressed size (a
    CSV's length) is checked before anything is read."""
    wafers = [good_wafer("L", f"w{i}", seed=i, size=40) for i in range(20)]
    path = tmp_path / f"dies{suffix}"
    io.write_die_table(wafers, path)
    monkeypatch.setattr(common, "MAX_TABLE_BYTES", 2000)
    monkeypatch.setattr(die_table.pq, "read_table", lambda *a, **k: pytest.fail("the table was read"))
    monkeypatch.setattr(die_table.pa_csv, "read_csv", lambda *a, **k: pytest.fail("the table was read"))
    (rejected,) = io.iter_source(path)
    assert isinstance(rejected, Rejected) and str(path) in rejected.reason
    assert "bytes; the limit is 2,000 (io.MAX_TABLE_BYTES)" in rejected.reason


def test_a_wafer_table_whose_row_group_is_over_the_byte_limit_is_refused_before_a_map_is_read(tmp_path, monkeypatch):
    path = tmp_path / "wafers.parquet"
    wafer_table.write_wafer_table([good_wafer("L", f"w{i}", seed=i, size=40) for i in range(20)], path)
    monkeypatch.setattr(common, "MAX_TABLE_BYTES", 2000)
    monkeypatch.setattr(wafer_table.pq.ParquetFile, "iter_batches", lambda *a, **k: pytest.fail("a map was read"))
    (rejected,) = io.iter_source(path)
    assert isinstance(rejected, Rejected) and str(path) in rejected.reason
    assert "a row group of the wafer table (uncompressed) holds" in rejected.reason
    assert "the limit is 2,000 (io.MAX_TABLE_BYTES)" in rejected.reason
