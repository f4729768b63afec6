"""The wafer-map model: one validated wafer, and the error every reader raises on bad input."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

OFF_WAFER, PASS, FAIL = 0, 1, 2
CLASS_NAMES: tuple[str, ...] = ("background", "ring", "scratch", "local_zone", "circle")
NUM_CLASSES = len(CLASS_NAMES)
DEFECT_CLASSES = tuple(range(1, NUM_CLASSES))
# Per-class die-count columns of dataset indexes and wafer reports.
DIE_COLUMNS = [f"dies_{name}" for name in CLASS_NAMES]
# Ids become file and directory names: NAME_MAX is 255 bytes, less room for suffixes and temporary prefixes.
MAX_ID_BYTES = 200
# The files a report root holds beside its lot directories: a lot of one of these names (any case, for
# case-insensitive file systems) would collide with them, so it is refused as an id.
INDEX_FILE = "index.html"
RUN_QUARANTINE_FILE = "quarantine.csv"
RESERVED_LOT_IDS = frozenset({INDEX_FILE, RUN_QUARANTINE_FILE})
# ASCII letters, digits, '_', '-' and '.', not led by '.', at most MAX_ID_BYTES: passes every check below
PLAIN_ID = re.compile(r"[A-Za-z0-9_\-][A-Za-z0-9_.\-]{0,199}")


class WaferError(ValueError):
    """Bad input: the message names the source file, the wafer (when known) and the problem."""

    def __init__(self, source: object, problem: str, lot_id: object = None, wafer_id: object = None):
        self.source = _shown(source)
        self.lot_id = None if lot_id is None else _shown(lot_id)
        self.wafer_id = None if wafer_id is None else _shown(wafer_id)
        self.problem = problem
        where = self.source
        if self.wafer_id is not None:
            where += f": wafer {self.lot_id}/{self.wafer_id}"
        elif self.lot_id is not None:  # a file in a lot directory that is not a wafer
            where += f": lot {self.lot_id}"
        super().__init__(f"{where}: {problem}")


def _shown(value: object) -> str:
    """Text as messages and quarantine records hold it: control characters and undecodable bytes
    escaped, so that any UTF-8 file, log or page can take it."""
    text = str(value)
    return repr(text)[1:-1] if _has_surrogates(text) or any(ord(ch) < 32 for ch in text) else text


def _has_surrogates(text: str) -> bool:
    """Lone surrogates are how Python decodes bytes that are not UTF-8 (file names, surrogateescape)."""
    return any("\ud800" <= ch <= "\udfff" for ch in text)


@dataclass(frozen=True, eq=False)
class Wafer:
    """A validated wafer map: uint8 HxW in {0 off-wafer, 1 pass, 2 fail}, optional uint8 class mask.

    `label` is a wafer-level class name when the source has one (WM-811K's failureType) and
    `source` is where the wafer was read from, for messages and quarantine records.
    """

    lot_id: str
    wafer_id: str
    map: np.ndarray
    mask: np.ndarray | None = None
    label: str | None = None
    source: str = field(default="<memory>")

    @property
    def shape(self) -> tuple[int, int]:
        return self.map.shape  # type: ignore[return-value]

    @property
    def n_dies(self) -> int:
        return int(np.count_nonzero(self.map))

    @property
    def n_fail(self) -> int:
        return int(np.count_nonzero(self.map == FAIL))


def check_id(value: object, what: str, source: object, lot_id: object = None, wafer_id: object = None) -> str:
    """An id becomes a directory or file name: refuse anything that could escape or hide one."""
    text = "" if value is None else str(value)
    if PLAIN_ID.fullmatch(text) and not (what == "lot_id" and text.lower() in RESERVED_LOT_IDS):
        return text  # the usual id, settled by one regex: ids are checked three times a wafer
    problem = None
    if text.strip() == "":
        problem = f"{what} is empty"
    elif text in (".", "..") or text.startswith("."):
        problem = f"{what} {text!r} starts with '.' and could escape or hide a directory"
    elif any(ch in text for ch in ("/", "\\", "\x00")):
        problem = f"{what} {text!r} contains '/', '\\' or NUL and could escape a directory"
    elif any(ord(ch) < 32 for ch in text):
        problem = f"{what} {text!r} contains control characters"
    elif _has_surrogates(text):
        problem = f"{what} {text!r} is not UTF-8 text (bytes of another encoding show as \\udcXX)"
    elif what == "lot_id" and text.lower() in RESERVED_LOT_IDS:
        problem = f"lot_id {text!r} is reserved: a report root holds the run's own {text.lower()} beside its lots"
    elif len(text.encode()) > MAX_ID_BYTES:
        problem = f"{what} {text[:40]!r}... is {len(text.encode())} bytes long; a file name holds {MAX_ID_BYTES}"
    if problem:
        raise WaferError(source, problem, lot_id, wafer_id)
    return text


def _check_grid(array: object, what: str, source: object, lot_id: str, wafer_id: str) -> np.ndarray:
    if not isinstance(array, np.ndarray):
        raise WaferError(source, f"{what} is {type(array).__name__}, not a NumPy array", lot_id, wafer_id)
    if array.ndim != 2:
        raise WaferError(source, f"{what} must be 2-D, got {array.ndim}-D shape {array.shape}", lot_id, wafer_id)
    if array.size == 0:
        raise WaferError(source, f"{what} is empty (shape {array.shape})", lot_id, wafer_id)
    if array.dtype.kind not in "iu":  # not issubdtype(np.integer): numpy counts timedelta64 as an integer
        raise WaferError(source, f"{what} has dtype {array.dtype}; an integer dtype is required", lot_id, wafer_id)
    return array


def validate_wafer(
    lot_id: object,
    wafer_id: object,
    wafer_map: object,
    mask: object = None,
    *,
    source: object = "<memory>",
    label: str | None = None,
) -> Wafer:
    """Check a wafer against the contract and return it with uint8 arrays; raise WaferError otherwise."""
    lot = check_id(lot_id, "lot_id", source, lot_id, wafer_id)
    wafer = check_id(wafer_id, "wafer_id", source, lot_id, wafer_id)
    grid = _check_grid(wafer_map, "map", source, lot, wafer)
    bad = (grid < OFF_WAFER) | (grid > FAIL)
    if bad.any():
        values = sorted({int(v) for v in np.unique(grid[bad])[:5]})
        raise WaferError(source, f"map holds values {values} outside {{0, 1, 2}}", lot, wafer)
    if not (grid != OFF_WAFER).any():
        raise WaferError(source, "map has no on-wafer die (all values are 0)", lot, wafer)
    grid = np.ascontiguousarray(grid, dtype=np.uint8)

    labels = None
    if mask is not None:
        labels = _check_grid(mask, "mask", source, lot, wafer)
        if labels.shape != grid.shape:
            raise WaferError(source, f"mask shape {labels.shape} differs from map shape {grid.shape}", lot, wafer)
        bad = (labels < 0) | (labels >= NUM_CLASSES)
        if bad.any():
            values = sorted({int(v) for v in np.unique(labels[bad])[:5]})
            raise WaferError(source, f"mask holds class ids {values} outside 0..{NUM_CLASSES - 1}", lot, wafer)
        off_labelled = int(np.count_nonzero((labels != 0) & (grid == OFF_WAFER)))
        if off_labelled:
            raise WaferError(source, f"mask labels {off_labelled} off-wafer dies; off-wafer must be 0", lot, wafer)
        labels = np.ascontiguousarray(labels, dtype=np.uint8)
    return Wafer(lot, wafer, grid, labels, label, str(source))


def class_die_counts(mask: np.ndarray, wafer_map: np.ndarray) -> np.ndarray:
    """On-wafer dies per class (int64, length NUM_CLASSES); whatever a mask says off-wafer is not counted."""
    mask, wafer_map = np.asarray(mask), np.asarray(wafer_map)
    if mask.shape != wafer_map.shape:
        raise ValueError(f"mask shape {mask.shape} differs from map shape {wafer_map.shape}")
    labels = mask[wafer_map != OFF_WAFER].astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise ValueError(f"mask holds class ids outside 0..{NUM_CLASSES - 1}")
    return np.bincount(labels, minlength=NUM_CLASSES)


def wafer_summary(wafer: Wafer, mask: np.ndarray | None, counts: np.ndarray | None = None) -> dict:
    """Ids, shape and die counts of a wafer, with per-class counts from `mask` (-1 when there is none);
    `counts`: class_die_counts of the mask, when the caller has them already."""
    if counts is None:
        counts = class_die_counts(mask, wafer.map) if mask is not None else [-1] * NUM_CLASSES
    return {"lot_id": wafer.lot_id, "wafer_id": wafer.wafer_id, "rows": wafer.shape[0], "cols": wafer.shape[1],
            "n_dies": wafer.n_dies, "n_fail": wafer.n_fail,
            **{column: int(count) for column, count in zip(DIE_COLUMNS, counts)}}
