import numpy as np
import pytest

from pipeline.wafer import WaferError, validate_wafer

GOOD = np.array([[0, 1, 0], [1, 2, 1], [0, 1, 0]], dtype=np.uint8)


def test_valid_wafer_is_returned_as_uint8():
    wafer = validate_wafer("LOT1", "07", GOOD.astype(np.int64), np.zeros((3, 3), np.int32), source="x.npy")
    assert wafer.map.dtype == np.uint8 and wafer.mask.dtype == np.uint8
    assert (wafer.n_dies, wafer.n_fail) == (5, 1)


@pytest.mark.parametrize(
    ("wafer_map", "mask", "problem"),
    [
        (np.array([[0, 1], [3, 2]]), None, r"values \[3\] outside \{0, 1, 2\}"),
        (np.array([[0, 1], [-1, 2]]), None, r"values \[-1\] outside"),
        (np.ones((2, 2, 2), np.uint8), None, r"map must be 2-D, got 3-D"),
        (np.ones(4, np.uint8), None, r"map must be 2-D, got 1-D"),
        (np.zeros((0, 5), np.uint8), None, r"map is empty"),
        (np.zeros((3, 3), np.uint8), None, r"no on-wafer die"),
        (GOOD.astype(np.float32), None, r"dtype float32; an integer dtype is required"),
        (GOOD.astype(bool), None, r"dtype bool; an integer dtype is required"),
        ([[0, 1], [1, 2]], None, r"map is list, not a NumPy array"),
        (GOOD, np.zeros((2, 3), np.uint8), r"mask shape \(2, 3\) differs from map shape \(3, 3\)"),
        (GOOD, np.full((3, 3), 1, np.uint8), r"mask labels 4 off-wafer dies"),
        (GOOD, np.full((3, 3), 7, np.uint8), r"mask holds class ids \[7\] outside 0..4"),
        (GOOD, GOOD.astype(np.float64), r"mask has dtype float64"),
    ],
)
def test_bad_maps_are_rejected_naming_file_and_wafer(wafer_map, mask, problem):
    with pytest.raises(WaferError, match=problem) as caught:
        validate_wafer("LOT1", "07", wafer_map, mask, source="inbox/LOT1/07.npy")
    assert str(caught.value).startswith("inbox/LOT1/07.npy: wafer LOT1/07: ")


@pytest.mark.parametrize(
    ("lot_id", "wafer_id", "problem"),
    [
        ("..", "01", r"lot_id '..' starts with '.'"),
        ("LOT1", "../etc", r"wafer_id '../etc' starts with '.'"),
        ("a/b", "01", r"lot_id 'a/b' contains '/'"),
        ("LOT1", "/abs", r"wafer_id '/abs' contains '/'"),
        ("LOT1", "x\x00y", r"'x\\x00y' contains '/'.* or NUL"),
        ("LOT1", "a\\b", r"contains '/'.* or NUL"),
        ("", "01", r"lot_id is empty"),
        ("LOT1", "a\nb", r"control characters"),
    ],
)
def test_ids_that_could_escape_a_directory_are_rejected(lot_id, wafer_id, problem):
    with pytest.raises(WaferError, match=problem) as caught:
        validate_wafer(lot_id, wafer_id, GOOD, source="table.parquet")
    assert str(caught.value).startswith("table.parquet: ")
