"""The map-size limit: refused before allocation, whatever the file claims, and configurable per call."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline import io
from pipeline.io import Rejected
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
