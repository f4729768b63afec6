"""The shipped real sets: recorded splits that are stable and disjoint, identical maps on one side, and
stratified epoch samples."""

import hashlib

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from pipeline import realdata
from pipeline.params import RealParams, RealSetParams, SplitParams
from pipeline.wafer import validate_wafer
from tests.real_fixture import tiny_real

pytestmark = pytest.mark.slow  # reads the whole shipped real sets

SHIPPED = RealParams()


@pytest.mark.parametrize("name", ["wm811k", "mixedwm38"])
def test_recorded_splits_are_the_content_splits_of_every_wafer(name):
    recorded = pd.read_csv(realdata.split_file(SHIPPED, name), dtype=str)
    computed = realdata.compute_splits(SHIPPED.sets[name].path, SHIPPED.split)
    pd.testing.assert_frame_equal(recorded, computed)  # stable: recomputing moves nothing
    assert recorded["wafer_id"].is_unique  # disjoint: one split per wafer
    shares = recorded["split"].value_counts(normalize=True)
    assert shares["train"] == pytest.approx(0.70, abs=0.01)
    assert shares["val"] == pytest.approx(0.15, abs=0.01) and shares["test"] == pytest.approx(0.15, abs=0.01)


@pytest.mark.parametrize("name", ["wm811k", "mixedwm38"])
def test_identical_maps_never_straddle_two_splits(name):
    table = pq.read_table(SHIPPED.sets[name].path, columns=["wafer_id", "rows", "cols", "map"]).to_pandas()
    table["content"] = [hashlib.sha256(f"{r}x{c}".encode() + m).hexdigest()
                        for r, c, m in zip(table["rows"], table["cols"], table["map"])]
    splits = realdata.read_splits(SHIPPED, name)
    table["split"] = table["wafer_id"].map(splits)
    assert table.groupby("content")["split"].nunique().max() == 1


def test_split_of_map_depends_on_content_only():
    split = SplitParams(train=0.7, val=0.15, test=0.15)
    grid = np.arange(12, dtype=np.uint8) % 3
    assert realdata.split_of_map(3, 4, grid.tobytes(), split) == realdata.split_of_map(3, 4, bytes(grid), split)
    seen = {realdata.split_of_map(4, 4, bytes([i, 1, 2, 0] * 4), split) for i in range(200)}
    assert seen == {"train", "val", "test"}


def test_load_real_set_refuses_a_wafer_without_a_recorded_split(tmp_path):
    block = tiny_real(tmp_path / "real", wafers=30)
    params = RealParams.model_validate(block)
    loaded = realdata.load_real_set(params, "wm811k")
    assert sum(len(w) for w in loaded.values()) == 30 and all(w.label for w in loaded["train"])
    path = realdata.split_file(params, "wm811k")
    pd.read_csv(path).iloc[1:].to_csv(path, index=False)
    with pytest.raises(ValueError, match="has no recorded split"):
        realdata.load_real_set(params, "wm811k")


def test_epoch_sample_caps_common_labels_and_tops_up_rare_ones():
    grid = np.array([[1, 2], [2, 1]], np.uint8)
    labels = ["none"] * 50 + ["Donut"] * 3 + ["Scratch"] * 10
    wafers = [validate_wafer("L", f"w{i}", grid, label=label) for i, label in enumerate(labels)]
    picked = realdata.epoch_sample(wafers, RealSetParams(path="x", per_label=8, min_per_label=6),
                                   np.random.default_rng(0))
    counts = pd.Series([labels[i] for i in picked]).value_counts()
    assert counts.to_dict() == {"none": 8, "Scratch": 8, "Donut": 6}
    none = [i for i in picked if labels[i] == "none"]
    assert len(set(none)) == 8  # without replacement while there are enough
    assert set(i for i in picked if labels[i] == "Donut") == {50, 51, 52}
