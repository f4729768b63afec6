"""The bad-input catalogue: each case builds, under a directory, sources holding good labelled wafers and one
kind of bad input, and says what must happen to it.

A case is fed both to `waferseg infer` (the bad input is quarantined with a message naming the file and the
wafer, the good wafers beside it are reported) and to ingest (the reader refuses it with a WaferError naming
the file; `waferseg ingest` quarantines the whole entry holding it and merges the others).
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import io
from pipeline.wafer import MAX_ID_BYTES, Wafer, validate_wafer

LOT = "LOT-R"
GOOD = 2  # good wafers beside the bad input
TOP = None  # quarantined in OUT/quarantine.csv: the input belongs to no usable lot


class Payload:
    """Unpickled, it creates `marker` (the pickle calls open(marker, "w")): proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def marker_of(root: Path) -> Path:
    return root / "PAYLOAD-RAN"


def good_wafer(lot: str, wafer_id: str, seed: int = 0, size: int = 10) -> Wafer:
    """A round labelled wafer: ~20 % fails, each fail labelled with a class id."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    on = (yy - (size - 1) / 2) ** 2 + (xx - (size - 1) / 2) ** 2 <= (size / 2) ** 2
    grid = np.where(on, rng.choice([1, 2], size=(size, size), p=[0.8, 0.2]), 0)
    mask = np.where(grid == 2, rng.integers(0, 5, grid.shape), 0)
    return validate_wafer(lot, wafer_id, grid, mask)


def good_wafers(lot: str = LOT, n: int = GOOD) -> list[Wafer]:
    return [good_wafer(lot, f"g{i}", seed=i) for i in range(n)]


@dataclass
class Built:
    sources: list[Path]  # what infer reads, in this order; each is one ingest entry
    bad_entry: Path  # the source (ingest entry) holding the bad input
    bad_file: Path  # the file the message names
    good: int  # wafers that must be reported
    bad: int  # inputs that must be quarantined
    wafer: str | None  # "lot/wafer" the message names, when the wafer is known
    quarantine_lot: str | None  # the lot whose quarantine.csv gets the rows; TOP for OUT/quarantine.csv
    shown_name: str = ""  # the file name as messages show it (escaped when it is not UTF-8)

    def __post_init__(self):
        self.shown_name = self.shown_name or self.bad_file.name


@dataclass(frozen=True)
class Case:
    kind: str
    build: Callable[[Path], Built]
    problem: str  # regex: a quarantine reason (and the strict reader's error) must match it
    ingest_problem: str | None = None  # why ingest quarantines bad_entry, when it differs from `problem`
    each_file_reads_alone: bool = False  # the bad input is two files that are each fine on their own
    labelled: bool = True  # False: its wafers carry neither masks nor labels, so ingest refuses every entry of it


# --- per-wafer NumPy lots ----------------------------------------------------------------------------------


def _good_lot(root: Path, lot: str = LOT) -> Path:
    io.write_npy_lots(good_wafers(lot), root)
    return root / lot


def _npy_case(kind: str, write_bad: Callable[[Path], Path], problem: str, wafer_id: str | None = "bad",
              shown_name: str = "") -> Case:
    """`write_bad(lot_dir)` puts one bad input into a lot of good wafers and returns its path."""

    def build(root: Path) -> Built:
        lot = _good_lot(root / "lots")
        bad = write_bad(lot)
        wafer = None if wafer_id is None else f"{LOT}/{wafer_id}"
        return Built([lot], lot, bad, GOOD, 1, wafer, LOT, shown_name)

    return Case(kind, build, problem)


def _save(name: str, array: np.ndarray, **kwargs) -> Callable[[Path], Path]:
    def write(lot: Path) -> Path:
        np.save(lot / name, array, **kwargs)
        return lot / name
    return write


def _write_bytes(name: str, content: Callable[[Path], bytes]) -> Callable[[Path], Path]:
    def write(lot: Path) -> Path:
        (lot / name).write_bytes(content(lot))
        return lot / name
    return write


def _truncated(lot: Path) -> bytes:
    return (lot / "g0.npy").read_bytes()[:-7]


def _object_array(lot: Path) -> Path:
    np.save(lot / "bad.npy", np.array([Payload(marker_of(lot.parents[1]))], dtype=object), allow_pickle=True)
    return lot / "bad.npy"


def _pickle_bytes(lot: Path) -> bytes:
    return pickle.dumps(Payload(marker_of(lot.parents[1])))


def _huge_header_only(lot: Path) -> Path:
    """A 5,000 x 5,000 uint8 map as a sparse file: the header, then a hole of 25 MB that takes no disk."""
    path = lot / "bad.npy"
    with open(path, "wb") as file:
        np.lib.format.write_array_header_1_0(file, {"descr": "|u1", "fortran_order": False, "shape": (5000, 5000)})
        file.truncate(file.tell() + 5000 * 5000)
    return path


def _with_mask(mask: np.ndarray) -> Callable[[Path], Path]:
    def write(lot: Path) -> Path:
        np.save(lot / "bad.npy", good_wafer(LOT, "bad").map)
        np.save(lot / "bad.mask.npy", mask)
        return lot / "bad.npy"
    return write


def _link_to_outside(name: str) -> Callable[[Path], Path]:
    """A symlink in the lot to a valid wafer outside it: following it would report a wafer of another place."""
    def write(lot: Path) -> Path:
        outside = lot.parents[1] / "elsewhere"
        outside.mkdir(exist_ok=True)
        np.save(outside / "secret.npy", good_wafer("ELSEWHERE", "secret", seed=9).map)
        if name.endswith(io.MASK_SUFFIX):
            np.save(lot / "bad.npy", good_wafer(LOT, "bad").map)
        os.symlink(outside / "secret.npy", lot / name)
        return lot / name
    return write


def _latin1_name(lot: Path) -> Path:
    path = Path(os.fsdecode(os.fsencode(lot) + b"/caf\xe9.npy"))
    np.save(path, good_wafer(LOT, "x").map)
    return path


GOOD_MAP = good_wafer(LOT, "bad").map
LINK = "symbolic link that leads out of its directory; not followed"

NPY_CASES = [
    _npy_case("npy_truncated", _write_bytes("bad.npy", _truncated), r"truncated: the header promises \d+ data bytes"),
    _npy_case("npy_corrupt", _write_bytes("bad.npy", lambda lot: b"\x93NUMPY\x01\x00\xff\xffnot a header"),
              r"unreadable or corrupt \.npy file"),
    _npy_case("npy_object_array_with_pickle", _object_array,
              r"holds Python objects \(dtype object\); only plain integer arrays are accepted"),
    _npy_case("npy_is_a_pickle", _write_bytes("bad.npy", _pickle_bytes),
              r"unreadable or corrupt \.npy file \(the magic string is not correct"),
    _npy_case("pickle_file_in_lot", _write_bytes("bad.pkl", _pickle_bytes),
              r"pickles are only read when named explicitly \(a pickle runs code\); not opened", wafer_id=None),
    _npy_case("npy_float_dtype", _save("bad.npy", GOOD_MAP.astype(np.float32)),
              r"map has dtype float32; an integer dtype is required"),
    _npy_case("npy_bool_dtype", _save("bad.npy", GOOD_MAP > 0), r"map has dtype bool; an integer dtype is required"),
    _npy_case("npy_negative_ints", _save("bad.npy", -GOOD_MAP.astype(np.int8)),
              r"map holds values \[-2, -1\] outside \{0, 1, 2\}"),
    _npy_case("npy_values_outside_0_1_2", _save("bad.npy", GOOD_MAP * 3), r"map holds values \[3, 6\] outside"),
    _npy_case("npy_nan", _save("bad.npy", np.where(GOOD_MAP == 2, np.nan, GOOD_MAP)),
              r"map has dtype float64; an integer dtype is required"),
    _npy_case("npy_1d", _save("bad.npy", GOOD_MAP.ravel()), r"map must be 2-D, got 1-D shape \(100,\)"),
    _npy_case("npy_3d", _save("bad.npy", GOOD_MAP[None]), r"map must be 2-D, got 3-D shape \(1, 10, 10\)"),
    _npy_case("npy_0x0", _save("bad.npy", np.zeros((0, 0), np.uint8)), r"map is empty \(shape \(0, 0\)\)"),
    _npy_case("npy_no_on_wafer_die", _save("bad.npy", np.zeros((10, 10), np.uint8)),
              r"map has no on-wafer die \(all values are 0\)"),
    _npy_case("npy_5000x5000", _huge_header_only,
              r"map shape \(5000, 5000\) exceeds the limit of 4096 dies per side"),
    _npy_case("npy_empty_file", _write_bytes("bad.npy", lambda lot: b""), r"empty file \(0 bytes\)"),
    _npy_case("mask_wrong_shape", _with_mask(np.zeros((3, 3), np.uint8)),
              r"mask shape \(3, 3\) differs from map shape \(10, 10\)"),
    _npy_case("mask_label_outside_0_4", _with_mask(np.where(GOOD_MAP == 2, 7, 0).astype(np.uint8)),
              r"mask holds class ids \[7\] outside 0\.\.4"),
    _npy_case("symlink_map_to_outside", _link_to_outside("bad.npy"), LINK),
    _npy_case("symlink_mask_to_outside", _link_to_outside("bad.mask.npy"), LINK),
    _npy_case("file_name_not_utf8", _latin1_name, r"wafer_id 'caf\\udce9' is not UTF-8 text",
              wafer_id="caf\\udce9", shown_name="caf\\udce9.npy"),
    _npy_case("wafer_id_too_long", _save("w" * (MAX_ID_BYTES + 10) + ".npy", GOOD_MAP),
              rf"wafer_id 'w+'\.\.\. is {MAX_ID_BYTES + 10} bytes long", wafer_id="w" * (MAX_ID_BYTES + 10)),
]


# --- die tables --------------------------------------------------------------------------------------------


def die_rows(wafer: Wafer) -> pd.DataFrame:
    rows, cols = np.nonzero(wafer.map)
    return pd.DataFrame({"lot_id": wafer.lot_id, "wafer_id": wafer.wafer_id, "row": rows, "col": cols,
                         "bin": wafer.map[rows, cols], "label": wafer.mask[rows, cols]})


def write_table(frame: pd.DataFrame, path: Path) -> Path:
    """CSV as pandas writes it; Parquet with every mixed-type column stored as text."""
    if path.suffix == ".csv":
        frame.to_csv(path, index=False)
    else:
        mixed = [c for c in frame.columns if frame[c].dtype == object and c not in io.ID_COLUMNS]
        frame.astype({c: str for c in mixed}).to_parquet(path, index=False)
    return path


def _table_case(kind: str, mutate: Callable[[pd.DataFrame], pd.DataFrame], problem: str, suffix: str,
                bad: int = 1, wafer: str | None = f"{LOT}/bad", quarantine_lot: str | None = LOT) -> Case:
    """A die table of good wafers plus the wafer `bad`, whose rows `mutate` spoils."""

    def build(root: Path) -> Built:
        root.mkdir(parents=True)
        spoiled = mutate(die_rows(good_wafer(LOT, "bad", seed=5)))
        table = pd.concat([*map(die_rows, good_wafers()), spoiled], ignore_index=True)
        path = write_table(table, root / f"dies{suffix}")
        return Built([path], path, path, GOOD, bad, wafer, quarantine_lot)

    return Case(f"{kind}{suffix}", build, problem)


def _set_first(column: str, value: int) -> Callable[[pd.DataFrame], pd.DataFrame]:
    def mutate(rows: pd.DataFrame) -> pd.DataFrame:
        rows.loc[0, column] = value
        return rows
    return mutate


def _text_bins(rows: pd.DataFrame) -> pd.DataFrame:
    rows["bin"] = rows["bin"].astype(str)
    rows.loc[0, "bin"] = "two"
    return rows


def _unsafe_wafer_ids(rows: pd.DataFrame) -> pd.DataFrame:
    return pd.concat([rows.assign(wafer_id=wafer_id) for wafer_id in ("../up", "a/b", "nul\x00byte")])


def _file_case(kind: str, write_bad: Callable[[Path], Path], problem: str) -> Case:
    """A whole file that cannot be read, given beside a lot of good wafers: one quarantine row at the top."""

    def build(root: Path) -> Built:
        lot = _good_lot(root / "lots")
        (root / "tables").mkdir()
        bad = write_bad(root / "tables")
        return Built([lot, bad], bad, bad, GOOD, 1, None, TOP)

    return Case(kind, build, problem)


def _without_bin(directory: Path) -> Path:
    table = pd.concat(map(die_rows, good_wafers("LOT-T")))
    return write_table(table.drop(columns="bin"), directory / "dies.csv")


def _latin1_csv(column: str) -> Callable[[Path], Built]:
    """A CSV of good wafers whose last line, a die of wafer `bad`, is latin-1 in `column`."""

    def build(root: Path) -> Built:
        root.mkdir(parents=True)
        path = write_table(pd.concat(map(die_rows, good_wafers())), root / "dies.csv")
        fields = {"lot_id": LOT.encode(), "wafer_id": b"bad", "row": b"0", "col": b"4", "bin": b"1", "label": b"0"}
        fields[column] = b"caf\xe9"
        with open(path, "ab") as file:
            file.write(b",".join(fields.values()) + b"\n")
        wafer = f"{LOT}/caf\\udce9" if column == "wafer_id" else f"{LOT}/bad"
        return Built([path], path, path, GOOD, 1, wafer, LOT)

    return build


def _duplicate_across_files(root: Path) -> Built:
    root.mkdir(parents=True)
    wafers = good_wafers(n=GOOD + 1)
    first = write_table(pd.concat(map(die_rows, wafers)), root / "a.csv")
    second = write_table(die_rows(wafers[0]), root / "b.csv")
    return Built([first, second], second, second, GOOD, 2, f"{LOT}/g0", LOT)


def _file(name: str, content: bytes) -> Callable[[Path], Path]:
    def write(directory: Path) -> Path:
        (directory / name).write_bytes(content)
        return directory / name
    return write


def _payload_pickle(directory: Path) -> Path:
    (directory / "LSWMD.pkl").write_bytes(pickle.dumps(Payload(marker_of(directory.parent))))
    return directory / "LSWMD.pkl"


TABLE_CASES = [
    *(_table_case("dies_duplicate_die", lambda rows: pd.concat([rows, rows.iloc[[3]]]),
                  r"1 duplicate \(row, col\) dies, e\.g\. \(\d+, \d+\)", suffix) for suffix in (".csv", ".parquet")),
    *(_table_case("dies_negative_coordinates", _set_first("col", -3), r"1 dies with a negative row or col", suffix)
      for suffix in (".csv", ".parquet")),
    *(_table_case("dies_non_numeric_bin", _text_bins, r"1 dies with a bin that is not a number", suffix)
      for suffix in (".csv", ".parquet")),
    *(_table_case("dies_label_outside_0_4", _set_first("label", 9), r"1 dies with label outside 0\.\.4 \(values 9\)",
                  suffix) for suffix in (".csv", ".parquet")),
    _table_case("dies_bin_outside_1_2", _set_first("bin", 7), r"1 dies with bin outside \{1, 2\} \(values 7\)", ".csv"),
    _table_case("dies_unsafe_wafer_ids", _unsafe_wafer_ids, r"could escape (?:or hide )?a directory", ".parquet", bad=3,
                wafer=f"{LOT}/../up"),
    _table_case("dies_unsafe_lot_id", lambda rows: rows.assign(lot_id="../escape"),
                r"lot_id '\.\./escape' starts with '\.' and could escape", ".csv", wafer="../escape/bad",
                quarantine_lot=TOP),
    Case("dies_latin1_wafer_id", _latin1_csv("wafer_id"), r"wafer_id 'caf\\udce9' is not UTF-8 text"),
    Case("dies_latin1_bin", _latin1_csv("bin"), r"1 dies with a bin that is not a number"),
    Case("dies_duplicate_wafer_across_files", _duplicate_across_files,
         r"2 inputs claim this wafer \(.*a\.csv, .*b\.csv\); none of them is reported",
         each_file_reads_alone=True, ingest_problem=r"wafer LOT-R/g0 in .*b\.csv is already in the dataset from .*a\.csv"),
    _file_case("dies_missing_column", _without_bin, r"missing required column\(s\) bin"),
    _file_case("dies_empty_csv", _file("dies.csv", b""), r"empty file \(0 bytes\)"),
    _file_case("dies_empty_parquet", _file("dies.parquet", b""), r"empty file \(0 bytes\)"),
    _file_case("dies_header_only", _file("dies.csv", b"lot_id,wafer_id,row,col,bin\n"),
               r"no dies: the table has its columns but no rows"),
    _file_case("dies_corrupt_parquet", _file("dies.parquet", b"PAR1 garbage PAR1"), r"unreadable die table"),
    # An inbox entry that is a pickle is never opened (infer_lots and nightly hand inbox entries to infer
    # unnamed). Named explicitly (ingest's arguments here), it is opened with the restricted unpickler,
    # which refuses the payload's global before anything runs.
    Case("pickle_file_at_top", _file_case("", _payload_pickle, "").build,
         r"pickles are only read when named explicitly \(a pickle runs code\); not opened",
         ingest_problem=r"cannot unpickle \(UnpicklingError: refused global io\.open: not part of a WM-811K"),
]


# --- wafer tables ------------------------------------------------------------------------------------------


def wafer_table_row(wafer: Wafer, failure_type: str | None = "Center") -> dict[str, object]:
    return {"lot_id": wafer.lot_id, "wafer_id": wafer.wafer_id, "rows": wafer.shape[0], "cols": wafer.shape[1],
            "map": wafer.map.tobytes(), "failure_type": failure_type}


def _wafer_table_case(kind: str, spoil: Callable[[dict], list[dict]], problem: str, bad: int = 1,
                      lot_column: bool = True) -> Case:
    """A wafer table of good wafers plus the wafer `bad`, whose row `spoil` turns into the rows written.
    Without the lot_id column the wafers form the lot `wafers-00000` (io.DEFAULT_LOT_WAFERS a lot).
    A wafer table holds no masks, so ingest refuses every one of them, like WM-811K files."""

    def build(root: Path) -> Built:
        root.mkdir(parents=True)
        rows = [*map(wafer_table_row, good_wafers()), *spoil(wafer_table_row(good_wafer(LOT, "bad", seed=5)))]
        table = pa.Table.from_pylist(rows)
        if not lot_column:
            table = table.drop_columns(["lot_id"])
        path = root / "wafers.parquet"
        pq.write_table(table, path)
        lot = LOT if lot_column else "wafers-00000"
        return Built([path], path, path, GOOD, bad, f"{lot}/bad", lot)

    return Case(f"wafer_table_{kind}", build, problem)


def _set(**fields: object) -> Callable[[dict], list[dict]]:
    return lambda row: [{**row, **fields}]


def _with_values_3(row: dict) -> list[dict]:
    grid = np.frombuffer(row["map"], np.uint8)
    return [{**row, "map": np.where(grid == 2, 3, grid).astype(np.uint8).tobytes()}]


def _wafer_table_file(spoil: Callable[[pa.Table], pa.Table]) -> Callable[[Path], Path]:
    def write(directory: Path) -> Path:
        path = directory / "wafers.parquet"
        pq.write_table(spoil(pa.Table.from_pylist([wafer_table_row(w) for w in good_wafers("LOT-T")])), path)
        return path
    return write


WAFER_TABLE_CASES = [
    _wafer_table_case("map_wrong_length", lambda row: [{**row, "map": row["map"][:-1]}],
                      r"table row 2: map holds 99 bytes; rows x cols 10 x 10 needs 100"),
    _wafer_table_case("values_outside_0_1_2", _with_values_3, r"map holds values \[3\] outside \{0, 1, 2\}"),
    _wafer_table_case("null_map", _set(map=None), r"table row 2: null map"),
    _wafer_table_case("5000x5000", _set(rows=5000, cols=5000),
                      r"table row 2: map shape \(5000, 5000\) exceeds the limit of 4096 dies per side"),
    _wafer_table_case("bad_failure_type", _set(failure_type="Edge-Loc+Bogus"),
                      r"bad failure_type: label 'Edge-Loc\+Bogus': unknown pattern\(s\) \['Bogus'\]"),
    _wafer_table_case("non_integer_rows", _set(rows=10.5), r"table row 2: rows x cols 10\.5 x 10 are not whole"),
    _wafer_table_case("duplicate_wafer", lambda row: [row, row], r"table row 3 repeats the wafer of table row 2",
                      bad=2),
    _wafer_table_case("no_lot_id_null_map", _set(map=None), r"table row 2: null map", lot_column=False),
    _file_case("wafer_table_missing_column", _wafer_table_file(lambda table: table.drop_columns(["map"])),
               r"missing required column\(s\) map"),
    _file_case("wafer_table_text_rows",
               _wafer_table_file(lambda table: table.set_column(2, "rows", table.column("rows").cast(pa.string()))),
               r"column 'rows' has type string; integers are required"),
    _file_case("wafer_table_header_only", _wafer_table_file(lambda table: table.slice(0, 0)),
               r"no wafers: the table has its columns but no rows"),
]


# --- WM-811K and trees of lots -----------------------------------------------------------------------------


def _wm811k(spoil: Callable[[list[str]], list[str]], bad: int, good: int, wafer: str | None) -> Callable[[Path], Built]:
    def build(root: Path) -> Built:
        root.mkdir(parents=True)
        wafers = [validate_wafer("LOT-W", str(i + 1), w.map) for i, w in enumerate(good_wafers(n=3))]
        path = root / "wm.csv"
        io.write_wm811k_csv(wafers, path)
        path.write_text("\n".join(spoil(path.read_text().splitlines())) + "\n")
        return Built([path], path, path, good, bad, wafer, "LOT-W")
    return build


def _unparsable_second_map(lines: list[str]) -> list[str]:
    head, second = lines[2].split("\t", 1)
    return [*lines[:2], head + "\t" + second.replace("]]", "]", 1), *lines[3:]]


def _tree_with_link(root: Path) -> Built:
    """A directory of lots where one lot is a symlink to a lot directory elsewhere."""
    _good_lot(root / "tree")
    io.write_npy_lots(good_wafers("LOT-ELSEWHERE"), root / "elsewhere")
    os.symlink(root / "elsewhere" / "LOT-ELSEWHERE", root / "tree" / "LOT-LINKED")
    return Built([root / "tree"], root / "tree", root / "tree" / "LOT-LINKED", GOOD, 1, None, TOP)


OTHER_CASES = [
    Case("wm811k_duplicate_row", _wm811k(lambda lines: [*lines, lines[1]], bad=2, good=2, wafer="LOT-W/1"),
         r"data row 3 repeats the wafer of data row 0", labelled=False),
    Case("wm811k_unparsable_map", _wm811k(_unparsable_second_map, bad=1, good=2, wafer="LOT-W/2"),
         r"data row 1: unparsable waferMap", labelled=False),
    Case("tree_lot_symlink_to_outside", _tree_with_link, LINK),
]

CASES = [*NPY_CASES, *TABLE_CASES, *WAFER_TABLE_CASES, *OTHER_CASES]
KINDS = sorted({case.kind.removesuffix(".csv").removesuffix(".parquet") for case in CASES})
