"""Readers and writers of pipeline.io: real WM-811K excerpts, round trips of every format, and one
test per bad input asserting that the message names the file and the problem."""

from __future__ import annotations

import copyreg
import json
import logging
import pickle
import re
import sys
import types
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from pandas.core.indexes.base import _new_Index
from pandas.core.internals import BlockManager

from pipeline import io
from pipeline.io import Rejected, wafer_table
from pipeline.wafer import Wafer, WaferError, validate_wafer

DATA = Path(__file__).resolve().parents[1] / "real_data" / "wm811k"
SUB100 = DATA / "sub100.csv"
UNLABELED = DATA / "unlabeled_lots.parquet"

needs_data = pytest.mark.skipif(
    not (SUB100.is_file() and UNLABELED.is_file()),
    reason=f"WM-811K excerpts not found under {DATA} (shared data checkout missing)",
)


# --- helpers ---------------------------------------------------------------------------------


def make_wafer(lot: str, wafer: str, rows: int = 9, cols: int = 11, *, seed: int = 0, mask: bool = False,
               label: str | None = None, trailing_off: bool = False) -> Wafer:
    """An elliptic wafer with ~20 % fails; optionally a mask and trailing all-off-wafer rows/cols."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:rows, :cols]
    on = ((yy - (rows - 1) / 2) / (rows / 2)) ** 2 + ((xx - (cols - 1) / 2) / (cols / 2)) ** 2 <= 1
    grid = np.where(on, rng.choice([1, 2], size=(rows, cols), p=[0.8, 0.2]), 0)
    if trailing_off:
        grid = np.pad(grid, ((0, 2), (0, 3)))
    labels = np.where(grid == 2, rng.integers(1, 5, grid.shape), 0) if mask else None
    return validate_wafer(lot, wafer, grid, labels, label=label)


def assert_same_wafers(read: list[Wafer], written: list[Wafer], *, masks: bool = True, labels: bool = True) -> None:
    assert [(w.lot_id, w.wafer_id) for w in read] == [(w.lot_id, w.wafer_id) for w in written]
    for got, want in zip(read, written):
        assert got.map.dtype == np.uint8
        np.testing.assert_array_equal(got.map, want.map)
        if masks:
            assert (got.mask is None) == (want.mask is None)
            if want.mask is not None:
                np.testing.assert_array_equal(got.mask, want.mask)
        if labels:
            assert got.label == want.label


def only_rejected(items: list[Wafer | Rejected]) -> list[Rejected]:
    return [item for item in items if isinstance(item, Rejected)]


def assert_rejected(reason: str, path: Path, problem: str) -> None:
    assert str(path) in reason, reason
    assert re.search(problem, reason), reason


def mixed_wafers() -> list[Wafer]:
    return [
        make_wafer("lotA", "1", seed=1, mask=True, label="Edge-Ring"),
        make_wafer("lotA", "2", seed=2, trailing_off=True, label="none"),
        make_wafer("lotB", "7", rows=13, cols=8, seed=3, mask=True, trailing_off=True),
    ]


# --- real WM-811K excerpts ---------------------------------------------------------------------


@needs_data
def test_sub100_csv_reads_every_wafer_with_its_label_and_shape():
    wafers = io.read_wafers(SUB100)

    raw = pd.read_csv(SUB100, sep="\t", index_col=0)
    assert io.source_kind(SUB100) == io.WM811K_CSV
    assert len(wafers) == 100
    assert Counter(w.label for w in wafers) == {"none": 83, "Edge-Loc": 8, "Loc": 4, "Center": 2, None: 3}
    for wafer, (_, row) in zip(wafers, raw.iterrows()):
        assert (wafer.lot_id, wafer.wafer_id) == (row.lotName, str(int(row.waferIndex)))
        np.testing.assert_array_equal(wafer.map, np.array(json.loads(row.waferMap)))


@needs_data
@pytest.mark.slow
def test_unlabeled_parquet_reads_every_wafer_and_die():
    # ~0.4 s here for 1,851,206 dies: Arrow columns, one argsort, a scatter per wafer.
    wafers = io.read_wafers(UNLABELED)

    dies = pd.read_parquet(UNLABELED)
    assert io.source_kind(UNLABELED) == io.DIE_TABLE
    assert len(wafers) == 1465
    assert len({w.lot_id for w in wafers}) == 837
    assert sum(w.n_dies for w in wafers) == len(dies) == 1_851_206
    assert sum(w.n_fail for w in wafers) == int((dies["bin"] == 2).sum())
    assert [(w.lot_id, w.wafer_id) for w in wafers] == sorted((w.lot_id, w.wafer_id) for w in wafers)
    extent = dies.groupby(["lot_id", "wafer_id"])[["row", "col"]].max() + 1
    assert [w.shape for w in wafers] == [tuple(int(v) for v in pair) for pair in extent.to_numpy()]


# --- round trips -----------------------------------------------------------------------------


def test_npy_tree_round_trip(tmp_path):
    written = mixed_wafers()
    io.write_npy_lots(reversed(written), tmp_path)

    assert io.source_kind(tmp_path) == io.NPY_TREE
    assert_same_wafers(io.read_wafers(tmp_path), written, labels=False)
    assert sorted(p.name for p in (tmp_path / "lotA").iterdir()) == ["1.mask.npy", "1.npy", "2.npy"]


def test_npy_lot_directory_is_one_lot(tmp_path):
    written = [make_wafer("lot9", "a", seed=4), make_wafer("lot9", "b", seed=5, mask=True)]
    io.write_npy_lots(written, tmp_path)

    assert io.source_kind(tmp_path / "lot9") == io.NPY_LOT
    assert_same_wafers(io.read_wafers(tmp_path / "lot9"), written, labels=False)


def test_npy_writer_removes_a_stale_mask(tmp_path):
    io.write_npy_lots([make_wafer("lot1", "w", mask=True)], tmp_path)
    io.write_npy_lots([make_wafer("lot1", "w")], tmp_path)

    assert io.read_wafers(tmp_path)[0].mask is None


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_die_table_round_trip_with_labels_and_trailing_off_wafer_rows(tmp_path, suffix):
    written = mixed_wafers()
    path = tmp_path / f"dies{suffix}"
    io.write_die_table(reversed(written), path)

    assert io.source_kind(path) == io.DIE_TABLE
    assert_same_wafers(io.read_wafers(path), written, labels=False)


def test_die_table_without_shape_columns_crops_to_the_dies(tmp_path):
    wafer = make_wafer("lot1", "w1", trailing_off=True)
    path = tmp_path / "dies.parquet"
    io.write_die_table([wafer], path)
    pq.write_table(pq.read_table(path).drop_columns(["map_rows", "map_cols"]), path)

    (read,) = io.read_wafers(path)
    assert read.shape == (wafer.shape[0] - 2, wafer.shape[1] - 3)
    np.testing.assert_array_equal(read.map, wafer.map[:-2, :-3])


def test_die_table_accepts_integer_ids_and_sorts_wafers(tmp_path):
    path = tmp_path / "dies.parquet"
    frame = pd.DataFrame({"lot_id": [20, 3, 3], "wafer_id": [1, 2, 1], "row": [0, 0, 1], "col": [0, 1, 0],
                          "bin": [1, 2, 1]})
    frame.to_parquet(path)

    wafers = io.read_wafers(path)
    assert [(w.lot_id, w.wafer_id) for w in wafers] == [("20", "1"), ("3", "1"), ("3", "2")]


@pytest.mark.slow
def test_die_table_of_a_million_dies_is_read(tmp_path):
    # 400 wafers x 2,500 dies; the reader never loops per die (about 0.3 s to read here).
    grids = np.random.default_rng(0).choice(np.array([1, 2], dtype=np.uint8), size=(400, 50, 50), p=[0.9, 0.1])
    written = [validate_wafer(f"lot{i // 25:03d}", f"{i % 25:02d}", grid) for i, grid in enumerate(grids)]
    path = tmp_path / "million.parquet"
    io.write_die_table(written, path)

    wafers = io.read_wafers(path)
    assert len(wafers) == 400
    assert sum(w.n_dies for w in wafers) == 1_000_000
    assert sum(w.n_fail for w in wafers) == int(np.count_nonzero(grids == 2))
    assert_same_wafers(wafers[::57], written[::57])


def wm811k_wafers() -> list[Wafer]:
    labels = ["Center", "Edge-Ring", "Scratch", "Edge-Loc", "none", None]
    return [make_wafer("lot1", str(i + 1), seed=i, label=label) for i, label in enumerate(labels)] + [
        make_wafer("lot2", "12", rows=20, cols=17, seed=9, label="Donut", trailing_off=True)
    ]


def test_wm811k_csv_round_trip(tmp_path):
    written = wm811k_wafers()
    path = tmp_path / "wm.csv"
    io.write_wm811k_csv(written, path)

    assert io.source_kind(path) == io.WM811K_CSV
    assert_same_wafers(io.read_wafers(path), written)
    assert path.read_text().startswith("\twaferMap\tdieSize\tlotName\twaferIndex\ttrianTestLabel\tfailureType\n")


def test_wm811k_pickle_round_trip(tmp_path):
    written = wm811k_wafers()
    path = tmp_path / "LSWMD.pkl"
    io.write_wm811k_pickle(written, path)

    assert io.source_kind(path) == io.WM811K_PICKLE
    assert_same_wafers(io.read_wafers(path, named=True), written)


def test_a_pickle_not_named_by_the_user_is_never_opened(tmp_path):
    """An inbox entry is read unnamed: a pickle there is refused before a byte of it is unpickled."""
    marker = tmp_path / "ran"
    path = tmp_path / "LSWMD.pkl"
    path.write_bytes(pickle.dumps(_CreatesFileWhenUnpickled(marker)))

    with pytest.raises(WaferError, match=re.escape(str(path)) + ".*pickles are only read when named explicitly"):
        io.read_wafers(path)
    with pytest.raises(WaferError, match="pickles are only read when named explicitly"):
        list(io.iter_source(path))
    assert not marker.exists()


@pytest.mark.parametrize("payload", ["open", "os.system", "pandas.read_pickle", "numpy.load"])
def test_a_named_pickle_may_only_build_a_dataframe(tmp_path, payload):
    """Named explicitly, a pickle is unpickled with an allowlist of what an LSWMD DataFrame is made of: any
    other global (a function that would run, from a module never imported) is refused, naming it."""
    marker = tmp_path / "ran"
    module, _, name = payload.rpartition(".")
    global_ref = f"{module or 'builtins'}\n{name}\n".encode()
    # GLOBAL module.name, then call it with the marker path: what a malicious __reduce__ pickles
    content = b"c" + global_ref + b"(" + pickle.dumps(str(marker), protocol=0)[:-1] + b"tR."
    path = tmp_path / "LSWMD.pkl"
    path.write_bytes(content)

    with pytest.raises(WaferError, match=rf"cannot unpickle \(UnpicklingError: refused global .*{name}"):
        io.read_wafers(path, named=True)
    assert not marker.exists()


def test_wm811k_writers_drop_masks_with_a_warning(tmp_path, caplog):
    path = tmp_path / "wm.csv"
    io.write_wm811k_csv([make_wafer("lot1", "1", mask=True, label="Scratch")], path)

    (read,) = io.read_wafers(path)
    assert read.mask is None and read.label == "Scratch"
    assert "1 masks are not written" in caplog.text


def fake_globals(homes: dict[str, str]) -> tuple[dict[str, types.ModuleType], dict[str, object]]:
    """Stand-ins for globals that old pandas pickles name (name -> module) and the modules holding them.
    Capitalised names become classes, others functions; they are only pickled by name, never called."""
    modules: dict[str, types.ModuleType] = {}
    fakes: dict[str, object] = {}
    for name, home in homes.items():
        fake = type(name, (), {}) if name[0].isupper() else (lambda cls, state: None)
        fake.__module__, fake.__qualname__ = home, name
        setattr(modules.setdefault(home, types.ModuleType(home)), name, fake)
        fakes[name] = fake
    return modules, fakes


def old_block_manager_state(manager: BlockManager) -> tuple:
    """BlockManager.__getstate__ of pandas 0.14.1 to 0.25: the state current pandas still accepts."""
    axes = list(manager.axes)
    blocks = [{"values": block.values, "mgr_locs": block.mgr_locs.indexer} for block in manager.blocks]
    items = [manager.items[block.mgr_locs.indexer] for block in manager.blocks]
    return axes, [block.values for block in manager.blocks], items, {"0.14.1": {"axes": axes, "blocks": blocks}}


def pickle_with_fakes(frame: pd.DataFrame, path: Path, monkeypatch: pytest.MonkeyPatch,
                      modules: dict[str, types.ModuleType], reduce: Callable[[object], object]) -> None:
    """Pickle with `reduce` overriding how objects reduce, while the fake modules are importable."""

    class OverridingPickler(pickle.Pickler):
        def reducer_override(self, obj: object) -> object:
            return reduce(obj)

    with monkeypatch.context() as patch:
        for name, module in modules.items():
            patch.setitem(sys.modules, name, module)
        with open(path, "wb") as file:
            OverridingPickler(file, protocol=2).dump(frame)
    assert not set(modules) & set(sys.modules)


def write_pandas019_pickle(frame: pd.DataFrame, path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pickle `frame` the way pandas 0.19 did: the frame and its BlockManager as argument-less NEWOBJ plus
    state, the indexes as `pandas.indexes.base._new_Index(<pandas.indexes class>, state)`."""
    modules, fake = fake_globals({"_new_Index": "pandas.indexes.base", "Index": "pandas.indexes.base",
                                  "Int64Index": "pandas.indexes.numeric", "RangeIndex": "pandas.indexes.range"})

    def reduce(obj: object) -> object:
        if isinstance(obj, pd.DataFrame):
            return copyreg.__newobj__, (pd.DataFrame,), {"_data": obj._mgr, "_typ": "dataframe", "_metadata": []}
        if isinstance(obj, BlockManager):
            return copyreg.__newobj__, (BlockManager,), old_block_manager_state(obj)
        if isinstance(obj, pd.RangeIndex):
            state = {"start": obj.start, "stop": obj.stop, "step": obj.step, "name": obj.name}
            return fake["_new_Index"], (fake["RangeIndex"], state)
        if isinstance(obj, pd.Index) and obj.dtype == np.int64:
            return fake["_new_Index"], (fake["Int64Index"], {"data": obj.to_numpy(), "name": obj.name})
        if isinstance(obj, pd.Index):
            return fake["_new_Index"], (fake["Index"], {"data": obj.to_numpy(dtype=object), "name": obj.name})
        return NotImplemented

    pickle_with_fakes(frame, path, monkeypatch, modules, reduce)


def wm811k_frame(tmp_path: Path, written: list[Wafer], index: list[int] | None) -> pd.DataFrame:
    io.write_wm811k_pickle(written, tmp_path / "current.pkl")
    frame = pd.read_pickle(tmp_path / "current.pkl")
    if index is not None:
        frame.index = pd.Index(index, dtype=np.int64)
    return frame


@pytest.mark.parametrize("index", [None, [10, 11, 12, 13, 14, 15, 16]], ids=["RangeIndex", "Int64Index"])
def test_pandas019_pickle_is_read_through_module_aliases(tmp_path, monkeypatch, index):
    written = wm811k_wafers()
    path = tmp_path / "LSWMD.pkl"
    write_pandas019_pickle(wm811k_frame(tmp_path, written, index), path, monkeypatch)

    with open(path, "rb") as file, pytest.raises(ModuleNotFoundError, match="pandas.indexes"):
        pickle.load(file)
    assert_same_wafers(io.read_wafers(path, named=True), written)


def test_pandas1_pickle_is_read_through_pandas_compat_unpickler(tmp_path, monkeypatch, caplog):
    # pandas 1.x pickled integer indexes as pandas.core.indexes.numeric.Int64Index, gone since 2.0;
    # only pandas' own compat table knows it, so the reader must fall back to that unpickler.
    written = wm811k_wafers()
    modules, fake = fake_globals({"Int64Index": "pandas.core.indexes.numeric"})

    def reduce(obj: object) -> object:
        if isinstance(obj, pd.Index) and not isinstance(obj, pd.RangeIndex) and obj.dtype == np.int64:
            return _new_Index, (fake["Int64Index"], {"data": obj.to_numpy(), "name": obj.name})
        return NotImplemented

    path = tmp_path / "LSWMD.pkl"
    pickle_with_fakes(wm811k_frame(tmp_path, written, list(range(7))), path, monkeypatch, modules, reduce)

    with open(path, "rb") as file, pytest.raises(ModuleNotFoundError, match="pandas.core.indexes.numeric"):
        pickle.load(file)
    with caplog.at_level(logging.INFO, logger="pipeline.io"):
        assert_same_wafers(io.read_wafers(path, named=True), written)
    assert "retrying with pandas' compat unpickler" in caplog.text


# --- source kinds ----------------------------------------------------------------------------


def test_source_kind_refuses_a_missing_path(tmp_path):
    with pytest.raises(WaferError, match=re.escape(str(tmp_path / "nope")) + ".*no such file"):
        io.source_kind(tmp_path / "nope")


def test_source_kind_refuses_an_unknown_suffix(tmp_path):
    path = tmp_path / "wafers.txt"
    path.write_text("x")
    with pytest.raises(WaferError, match=re.escape(str(path)) + ".*unknown input format '.txt'.*wafer table"):
        io.iter_source(path)


def test_source_kind_tells_a_wafer_table_from_a_die_table_by_its_columns(tmp_path):
    wafers = mixed_wafers()
    io.write_die_table(wafers, tmp_path / "dies.parquet")
    wafer_table.write_wafer_table(wafers, tmp_path / "wafers.parquet")

    assert io.source_kind(tmp_path / "dies.parquet") == io.DIE_TABLE
    assert io.source_kind(tmp_path / "wafers.parquet") == io.WAFER_TABLE
    assert_same_wafers(io.read_wafers(tmp_path / "wafers.parquet"), wafers, masks=False)


def test_source_kind_refuses_an_empty_directory(tmp_path):
    with pytest.raises(WaferError, match=re.escape(str(tmp_path)) + ".*empty directory"):
        io.read_wafers(tmp_path)


# --- rejected NumPy inputs -------------------------------------------------------------------


class _CreatesFileWhenUnpickled:
    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def _truncated(path: Path) -> None:
    np.save(path, np.ones((30, 30), dtype=np.uint8))
    path.write_bytes(path.read_bytes()[:-100])


def _oversized_header(path: Path) -> None:
    with open(path, "wb") as file:
        np.lib.format.write_array_header_1_0(file, {"descr": "|u1", "fortran_order": False, "shape": (5000, 5000)})


BAD_NPY = {
    "corrupt": (lambda p: p.write_bytes(b"not numpy at all"), "unreadable or corrupt .npy"),
    "truncated": (_truncated, r"truncated: the header promises 900 data bytes"),
    "object_array": (lambda p: np.save(p, np.array([[1, None]], dtype=object)), r"holds Python objects"),
    "oversized": (_oversized_header, r"shape \(5000, 5000\) exceeds the limit of 4096"),
    "bad_values": (lambda p: np.save(p, np.full((3, 3), 3)), r"outside \{0, 1, 2\}"),
    "float_map": (lambda p: np.save(p, np.ones((3, 3))), r"dtype float64; an integer dtype is required"),
}


@pytest.mark.parametrize("case", BAD_NPY)
def test_bad_npy_is_rejected_alone(tmp_path, case):
    io.write_npy_lots([make_wafer("lot1", "good")], tmp_path)
    bad = tmp_path / "lot1" / "bad.npy"
    make, problem = BAD_NPY[case]
    make(bad)

    items = list(io.iter_source(tmp_path))
    assert [item.wafer_id for item in items] == ["bad", "good"]
    (rejected,) = only_rejected(items)
    assert (rejected.lot_id, rejected.wafer_id) == ("lot1", "bad")
    assert_rejected(rejected.reason, bad, problem)
    with pytest.raises(WaferError, match=problem):
        io.read_wafers(tmp_path)


def test_mask_of_another_shape_is_rejected(tmp_path):
    io.write_npy_lots([make_wafer("lot1", "w")], tmp_path)
    np.save(tmp_path / "lot1" / "w.mask.npy", np.zeros((2, 2), dtype=np.uint8))

    (rejected,) = io.iter_source(tmp_path)
    assert_rejected(rejected.reason, tmp_path / "lot1" / "w.npy", r"mask shape \(2, 2\) differs from map shape")


def test_orphan_mask_is_rejected(tmp_path):
    io.write_npy_lots([make_wafer("lot1", "w", mask=True)], tmp_path)
    (tmp_path / "lot1" / "w.npy").unlink()

    (rejected,) = io.iter_source(tmp_path)
    assert_rejected(rejected.reason, tmp_path / "lot1" / "w.mask.npy", r"mask without its map w\.npy")


def test_pickle_in_a_lot_directory_is_quarantined_unopened(tmp_path):
    io.write_npy_lots([make_wafer("lot1", "w")], tmp_path)
    sentinel = tmp_path / "unpickled"
    planted = tmp_path / "lot1" / "LSWMD.pkl"
    planted.write_bytes(pickle.dumps(_CreatesFileWhenUnpickled(sentinel)))

    items = list(io.iter_source(tmp_path))
    (rejected,) = only_rejected(items)
    assert (rejected.lot_id, rejected.wafer_id) == ("lot1", None)
    assert_rejected(rejected.reason, planted, "pickles are only read when named explicitly")
    assert not sentinel.exists()
    assert len(items) == 2


def test_other_files_and_directories_in_a_lot_are_quarantined(tmp_path):
    io.write_npy_lots([make_wafer("lot1", "w")], tmp_path)
    (tmp_path / "lot1" / "notes.txt").write_text("hello")
    (tmp_path / "lot1" / "nested").mkdir()
    (tmp_path / "lot1" / ".DS_Store").write_text("hidden files are not inputs")

    reasons = {Path(r.source).name: r.reason for r in only_rejected(list(io.iter_source(tmp_path)))}
    assert set(reasons) == {"notes.txt", "nested"}
    assert_rejected(reasons["notes.txt"], tmp_path / "lot1" / "notes.txt", "lot lot1: not a wafer file")
    assert_rejected(reasons["nested"], tmp_path / "lot1" / "nested", "directory inside a lot directory")


def test_stray_file_beside_lot_directories_is_quarantined(tmp_path):
    io.write_npy_lots([make_wafer("lot1", "w")], tmp_path)
    (tmp_path / "readme.md").write_text("x")

    items = list(io.iter_source(tmp_path))
    assert len(items) == 2
    assert_rejected(only_rejected(items)[0].reason, tmp_path / "readme.md", "unknown input format '.md'")


def test_a_stray_npy_beside_lot_directories_is_quarantined_and_the_lots_read(tmp_path):
    """One wafer file dropped at the top of an inbox must not turn the inbox into one lot."""
    io.write_npy_lots([make_wafer("lot1", "a"), make_wafer("lot2", "b")], tmp_path)
    np.save(tmp_path / "stray.npy", make_wafer("x", "stray").map)

    items = list(io.iter_source(tmp_path))
    assert sorted((w.lot_id, w.wafer_id) for w in items if isinstance(w, Wafer)) == [("lot1", "a"), ("lot2", "b")]
    (rejected,) = only_rejected(items)
    assert_rejected(rejected.reason, tmp_path / "stray.npy", "beside lot directories is not read")


def test_die_and_wafer_tables_beside_lot_directories_are_read_and_a_pickle_is_not_opened(tmp_path):
    io.write_npy_lots([make_wafer("lot1", "a")], tmp_path)
    io.write_die_table([make_wafer("lot2", "b")], tmp_path / "dies.csv")
    wafer_table.write_wafer_table([make_wafer("lot3", "c")], tmp_path / "wafers.parquet")
    (tmp_path / "evil.pkl").write_bytes(b"not opened")

    items = list(io.iter_source(tmp_path))
    assert sorted(w.lot_id for w in items if isinstance(w, Wafer)) == ["lot1", "lot2", "lot3"]
    (rejected,) = only_rejected(items)
    assert_rejected(rejected.reason, tmp_path / "evil.pkl", "pickles are only read when named explicitly")


def test_a_directory_of_die_tables_alone_is_read_as_an_inbox(tmp_path):
    io.write_die_table([make_wafer("lot1", "a")], tmp_path / "one.parquet")
    io.write_die_table([make_wafer("lot2", "b")], tmp_path / "two.csv")
    items = list(io.iter_source(tmp_path))
    assert sorted(w.lot_id for w in items) == ["lot1", "lot2"]


# --- rejected die tables ---------------------------------------------------------------------


def die_rows(lot: str, wafer: str, size: int = 3) -> list[dict]:
    return [{"lot_id": lot, "wafer_id": wafer, "row": r, "col": c, "bin": 1 + (r == c), "label": 0,
             "map_rows": size, "map_cols": size} for r in range(size) for c in range(size)]


def _set(field: str, value: object, die: int = 0):
    def mutate(rows: list[dict]) -> None:
        rows[die][field] = value
    return mutate


BAD_DIES = {
    "null_bin": (_set("bin", None), r"1 dies with a null row, col or bin"),
    "bin_3": (_set("bin", 3), r"1 dies with bin outside \{1, 2\} \(values 3\)"),
    "negative_row": (_set("row", -1), r"1 dies with a negative row or col"),
    "fractional_col": (_set("col", 1.5), r"1 dies with a non-integer row or col"),
    "duplicate": (lambda rows: rows.append(dict(rows[4])), r"1 duplicate \(row, col\) dies, e\.g\. \(1, 1\)"),
    "label_7": (_set("label", 7), r"1 dies with label outside 0\.\.4 \(values 7\)"),
    "partial_label": (_set("label", None), r"1 dies with a null label while other dies have one"),
    "huge_row": (_set("row", 5000), r"beyond the limit of 4096 dies per side"),
    "map_rows_too_small": (lambda rows: [r.update(map_rows=2) for r in rows],
                           r"map_rows x map_cols \(2, 3\) is too small for the dies, which need \(3, 3\)"),
    "map_rows_huge": (lambda rows: [r.update(map_rows=99_999) for r in rows],
                      r"map_rows/map_cols beyond the limit of 4096 dies per side"),
    "map_rows_vary": (_set("map_rows", 4), r"map_rows/map_cols differ between dies"),
    "empty_lot_id": (lambda rows: [r.update(lot_id=None) for r in rows], r"lot_id is empty"),
}


def write_rows(rows: list[dict], path: Path) -> None:
    frame = pd.DataFrame(rows)
    if path.suffix == ".csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path, index=False)


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
@pytest.mark.parametrize("case", BAD_DIES)
def test_bad_wafer_in_a_die_table_is_rejected_alone(tmp_path, case, suffix):
    bad_rows = die_rows("lot1", "w1")
    mutate, problem = BAD_DIES[case]
    mutate(bad_rows)
    path = tmp_path / f"dies{suffix}"
    write_rows(die_rows("lot1", "w2") + bad_rows, path)

    items = list(io.iter_source(path))
    assert len(items) == 2
    (good,) = [item for item in items if isinstance(item, Wafer)]
    assert (good.wafer_id, good.shape) == ("w2", (3, 3))
    (rejected,) = only_rejected(items)
    assert rejected.wafer_id == "w1"
    assert_rejected(rejected.reason, path, problem)
    with pytest.raises(WaferError, match=problem):
        io.read_wafers(path)


BAD_DIE_FILES = {
    "missing_columns": (lambda rows: [(r.pop("col"), r.pop("bin")) for r in rows],
                        r"missing required column\(s\) col, bin"),
    "boolean_bins": (lambda rows: [r.update(bin=r["bin"] == 2) for r in rows],
                     r"column 'bin' has type bool; numbers are required"),
    "one_shape_column": (lambda rows: [r.pop("map_cols") for r in rows],
                         r"columns map_rows and map_cols come together; only one is present"),
}


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
@pytest.mark.parametrize("case", BAD_DIE_FILES)
def test_bad_die_table_file_is_one_rejection(tmp_path, case, suffix):
    rows = die_rows("lot1", "w1") + die_rows("lot2", "w1")
    mutate, problem = BAD_DIE_FILES[case]
    mutate(rows)
    path = tmp_path / f"dies{suffix}"
    write_rows(rows, path)

    (rejected,) = io.iter_source(path)
    assert (rejected.lot_id, rejected.wafer_id) == (None, None)
    assert_rejected(rejected.reason, path, problem)
    with pytest.raises(WaferError, match=problem):
        io.read_wafers(path)


def test_corrupt_parquet_is_one_rejection(tmp_path):
    path = tmp_path / "dies.parquet"
    path.write_bytes(b"PAR1 but not really")

    (rejected,) = io.iter_source(path)
    assert_rejected(rejected.reason, path, "unreadable die table")


# --- rejected WM-811K inputs -----------------------------------------------------------------


def wm811k_row(index: str = "1.0", wafer_map: str = "[[0, 1, 2], [1, 1, 0]]", failure: str = "[[none]]",
               lot: str = "lot1") -> dict:
    return {"waferMap": wafer_map, "dieSize": 4.0, "lotName": lot, "waferIndex": index,
            "trianTestLabel": "[[Training]]", "failureType": failure}


BAD_WM811K_ROWS = {
    "cut_json": (wm811k_row(wafer_map="[[0, 1], [2"), r"data row 1: unparsable waferMap"),
    "ragged": (wm811k_row(wafer_map="[[0, 1], [2]]"), r"data row 1: unparsable waferMap"),
    "text_cells": (wm811k_row(wafer_map='[["a", "b"]]'), r"data row 1: unparsable waferMap \(not a grid"),
    "bad_value": (wm811k_row(wafer_map="[[0, 5]]"), r"map holds values \[5\] outside \{0, 1, 2\}"),
    "unknown_failure": (wm811k_row(failure="[[Bogus]]"), r"data row 1: unknown failureType 'Bogus'"),
    "fractional_index": (wm811k_row(index="2.5"), r"lot lot1: data row 1: waferIndex '2.5' is not an integer"),
    "duplicate": (wm811k_row(index="7"), r"wafer lot1/7: data row 1 repeats the wafer of data row 0"),
}


@pytest.mark.parametrize("case", BAD_WM811K_ROWS)
def test_bad_wm811k_csv_row_is_rejected_alone(tmp_path, case):
    bad, problem = BAD_WM811K_ROWS[case]
    path = tmp_path / "wm.csv"
    pd.DataFrame([wm811k_row(index="7"), bad]).to_csv(path, sep="\t")

    items = list(io.iter_source(path))
    assert len(items) == 2 and isinstance(items[0], Wafer)
    assert_rejected(items[1].reason, path, problem)
    with pytest.raises(WaferError, match=problem):
        io.read_wafers(path)


def test_wm811k_csv_without_lot_names_is_one_rejection(tmp_path):
    path = tmp_path / "wm.csv"
    pd.DataFrame([wm811k_row()]).drop(columns="lotName").to_csv(path, sep="\t")

    (rejected,) = io.iter_source(path)
    assert_rejected(rejected.reason, path, r"missing required column\(s\) lotName")


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"\x80\x04 garbage", r"cannot unpickle"),
        (pickle.dumps([1, 2, 3]), r"holds a list, not a WM-811K DataFrame"),
        (pickle.dumps(pd.DataFrame({"lotName": ["lot1"], "waferIndex": [1.0]})), r"missing required column\(s\) "
                                                                                    r"waferMap"),
    ],
    ids=["garbage", "not_a_frame", "missing_column"],
)
def test_bad_wm811k_pickle_is_one_rejection(tmp_path, content, problem):
    path = tmp_path / "LSWMD.pkl"
    path.write_bytes(content)

    (rejected,) = io.iter_source(path, named=True)
    assert_rejected(rejected.reason, path, problem)
    with pytest.raises(WaferError, match=problem):
        io.read_wafers(path, named=True)


# --- writers refuse what their format cannot hold --------------------------------------------


def test_writers_refuse_a_wafer_twice(tmp_path):
    wafer = make_wafer("lot1", "1")
    with pytest.raises(WaferError, match=r"wafer lot1/1: the wafer appears twice"):
        io.write_die_table([wafer, wafer], tmp_path / "dies.parquet")


def test_wm811k_writers_need_integer_wafer_ids(tmp_path):
    with pytest.raises(WaferError, match=r"wafer lot1/01: WM-811K needs a wafer_id that is a plain integer"):
        io.write_wm811k_csv([make_wafer("lot1", "01")], tmp_path / "wm.csv")


@pytest.mark.parametrize("label", ["local_zone", "Center+Scratch"])
def test_wm811k_writers_need_a_single_wm811k_label(tmp_path, label):
    """Wafer.label is the source's label, not a class name; a MixedWM38 set has no WM-811K failureType."""
    problem = rf"wafer lot1/1: label '{re.escape(label)}' is not a single WM-811K failureType \(one of Center, "
    with pytest.raises(WaferError, match=problem):
        io.write_wm811k_pickle([make_wafer("lot1", "1", label=label)], tmp_path / "wm.pkl")
    assert not (tmp_path / "wm.pkl").exists()


def test_die_table_writer_needs_a_known_suffix(tmp_path):
    with pytest.raises(WaferError, match=r"written as \.csv or \.parquet, not '\.xlsx'"):
        io.write_die_table([make_wafer("lot1", "1")], tmp_path / "dies.xlsx")
