import numpy as np
import pandas as pd
import pytest

from pipeline.dataset import SPLITS, WaferDataset, assign_splits, dataset_stats, merge_datasets, write_dataset
from pipeline.params import DatasetParams, SplitParams
from pipeline.wafer import WaferError, validate_wafer


def _wafers(n_lots=12, per_lot=3, seed=0, prefix="L"):
    rng = np.random.default_rng(seed)
    for lot in range(n_lots):
        shape = (int(rng.integers(5, 12)), int(rng.integers(5, 12)))
        for w in range(per_lot):
            wafer_map = rng.integers(1, 3, size=shape).astype(np.uint8)
            wafer_map[0, 0] = 0
            mask = np.where(wafer_map == 2, rng.integers(0, 5, size=shape), 0).astype(np.uint8)
            yield validate_wafer(f"{prefix}{lot:03d}", f"{w:02d}", wafer_map, mask)


def test_round_trip_and_index(tmp_path):
    originals = list(_wafers())
    params = DatasetParams(dir=tmp_path / "ds", shard_wafers=5)
    index = write_dataset(iter(originals), params.dir, params, seed=1)
    assert len(list((params.dir / "shards").glob("*.npz"))) == 8  # 36 wafers / 5 per shard
    dataset = WaferDataset(params.dir)
    assert len(dataset) == len(originals)
    for original, stored in zip(originals, dataset.wafers()):
        assert (original.lot_id, original.wafer_id) == (stored.lot_id, stored.wafer_id)
        np.testing.assert_array_equal(original.map, stored.map)
        np.testing.assert_array_equal(original.mask, stored.mask)
    row = index.iloc[0]
    counts = np.bincount(originals[0].mask.ravel(), minlength=5)
    assert row["dies_ring"] == counts[1] and row["n_fail"] == originals[0].n_fail
    assert row["dies_background"] + counts[1:].sum() == originals[0].n_dies


def test_a_lot_never_spans_two_splits(tmp_path):
    params = DatasetParams(dir=tmp_path / "ds", shard_wafers=100)
    index = write_dataset(_wafers(n_lots=30), params.dir, params, seed=3)
    assert (index.groupby("lot_id")["split"].nunique() == 1).all()
    assert set(index["split"]) == set(SPLITS)
    assert sorted(index["split"].value_counts().to_dict().items()) == [("test", 9), ("train", 72), ("val", 9)]


def test_splits_are_seeded_and_every_split_gets_a_lot():
    lots = [f"L{i}" for i in range(3)]
    assert sorted(assign_splits(lots, SplitParams(), seed=0).values()) == ["test", "train", "val"]
    many = [f"L{i}" for i in range(50)]
    assert assign_splits(many, SplitParams(), 5) == assign_splits(reversed(many), SplitParams(), 5)
    assert assign_splits(many, SplitParams(), 5) != assign_splits(many, SplitParams(), 6)


def test_duplicate_wafer_fails_and_leaves_nothing(tmp_path):
    wafers = list(_wafers(n_lots=1, per_lot=2))
    params = DatasetParams(dir=tmp_path / "ds")
    with pytest.raises(WaferError, match="wafer L000/00: duplicate wafer"):
        write_dataset([wafers[0], wafers[1], wafers[0]], params.dir, params, seed=0)
    assert not params.dir.exists()
    assert list(tmp_path.iterdir()) == []


def test_failed_rewrite_keeps_the_old_dataset(tmp_path):
    params = DatasetParams(dir=tmp_path / "ds")
    write_dataset(_wafers(n_lots=3), params.dir, params, seed=0)

    def broken():
        yield from _wafers(n_lots=1)
        raise RuntimeError("generator died")

    with pytest.raises(RuntimeError):
        write_dataset(broken(), params.dir, params, seed=0)
    assert len(WaferDataset(params.dir)) == 9


def test_stats_table(tmp_path):
    params = DatasetParams(dir=tmp_path / "ds")
    index = write_dataset(_wafers(), params.dir, params, seed=0)
    stats = dataset_stats(index)
    assert stats.loc["all", "wafers"] == 36
    assert stats.loc["all", "dies"] == index["n_dies"].sum()
    assert stats.loc["all", "wafers_ring"] == (index["dies_ring"] > 0).sum()
    assert isinstance(stats, pd.DataFrame) and list(stats.index[:-1]) == [s for s in SPLITS if s in stats.index]


def test_not_a_dataset(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a waferseg dataset"):
        WaferDataset(tmp_path)


def test_split_cli_merges_synthetic_and_real_labelled_sets_and_refuses_a_wafer_in_both(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from pipeline.cli import app
    from pipeline.params import DatasetParams

    monkeypatch.chdir(tmp_path)
    synthetic, real = list(_wafers(n_lots=4)), list(_wafers(n_lots=3, prefix="REAL"))
    write_dataset(synthetic, tmp_path / "build" / "synthetic", DatasetParams(), seed=0)
    (tmp_path / "params.yaml").write_text("seed: 2\n")
    result = CliRunner().invoke(app, ["split"])  # no real labelled data yet: the synthetic set alone
    assert result.exit_code == 0, result.output
    assert len(WaferDataset(tmp_path / "build" / "dataset")) == len(synthetic)

    write_dataset(real, tmp_path / "data" / "labelled", DatasetParams(), seed=0)
    assert CliRunner().invoke(app, ["split"]).exit_code == 0
    merged = WaferDataset(tmp_path / "build" / "dataset")
    stored = {(w.lot_id, w.wafer_id): w for w in merged.wafers()}
    assert len(stored) == len(synthetic) + len(real)
    for wafer in real:
        np.testing.assert_array_equal(stored[wafer.lot_id, wafer.wafer_id].mask, wafer.mask)
    assert set(merged.index.groupby("lot_id")["split"].nunique()) == {1}  # a lot never spans two splits

    write_dataset(real + synthetic[:1], tmp_path / "data" / "labelled", DatasetParams(), seed=0)
    with pytest.raises(WaferError, match="duplicate wafer in dataset input.*also in"):
        merge_datasets([tmp_path / "build" / "synthetic", tmp_path / "data" / "labelled"],
                       tmp_path / "out", DatasetParams(), seed=0)


def test_the_same_wafers_give_the_same_bytes_whenever_they_are_written(tmp_path, monkeypatch):
    import time

    from pipeline.versioning import dataset_version

    wafers = list(_wafers(n_lots=3))
    write_dataset(wafers, tmp_path / "a", DatasetParams(), seed=0)
    later = time.localtime(time.time() + 3600)
    monkeypatch.setattr(time, "localtime", lambda *args: later)  # zip members would carry this time
    write_dataset(wafers, tmp_path / "b", DatasetParams(), seed=0)
    assert dataset_version(tmp_path / "a") == dataset_version(tmp_path / "b")
    assert [w.map.tolist() for w in WaferDataset(tmp_path / "b").wafers()] == [w.map.tolist() for w in wafers]
