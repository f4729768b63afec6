"""Labelled datasets on disk: a few compressed shards plus one index table, fit for DVC.

Layout of a dataset directory:
    index.parquet          one row per wafer: ids, shape, counts, split, where its arrays live
    shards/shard-NNNNN.npz maps and masks of up to `shard_wafers` wafers, flattened and concatenated
A lot never spans two splits; splits are drawn per lot with the seed.
"""

from __future__ import annotations

import logging
import shutil
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import replace
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.atomic import recover_directory, replace_directory, staging_directory
from pipeline.params import DatasetParams, SplitParams
from pipeline.wafer import CLASS_NAMES, Wafer, WaferError, validate_wafer, wafer_summary

log = logging.getLogger(__name__)

INDEX_FILE = "index.parquet"
SHARD_DIR = "shards"
SPLITS = ("train", "val", "test")
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


def assign_splits(lot_ids: Iterable[str], split: SplitParams, seed: int) -> dict[str, str]:
    """Shuffle the lots with the seed and cut them by the split fractions; every split gets a lot
    when there are at least three."""
    lots = sorted(set(lot_ids))
    order = np.random.default_rng(seed).permutation(len(lots))
    n_val = round(len(lots) * split.val)
    n_test = round(len(lots) * split.test)
    if len(lots) >= len(SPLITS):
        n_val, n_test = max(n_val, 1), max(n_test, 1)
    n_train = len(lots) - n_val - n_test
    names = ["train"] * n_train + ["val"] * n_val + ["test"] * n_test
    return {lots[i]: name for i, name in zip(order, names)}


def _index_row(wafer: Wafer, shard: int, offset: int) -> dict:
    return {**wafer_summary(wafer, wafer.mask), "label": wafer.label, "has_mask": wafer.mask is not None,
            "source": str(wafer.source), "shard": shard, "offset": offset}


def _write_shard(directory: Path, number: int, wafers: list[Wafer]) -> None:
    """An .npz np.load reads, written with a fixed timestamp: the same wafers give the same bytes, so the
    dataset's content hash (and DVC's md5) changes only when the data does."""
    maps = np.concatenate([w.map.ravel() for w in wafers])
    masks = np.concatenate([w.mask.ravel() if w.mask is not None else np.zeros(w.map.size, np.uint8)
                            for w in wafers])
    with zipfile.ZipFile(directory / f"shard-{number:05d}.npz", "w") as archive:
        for name, array in (("maps", maps), ("masks", masks)):
            member = zipfile.ZipInfo(f"{name}.npy", date_time=ZIP_EPOCH)
            member.compress_type = zipfile.ZIP_DEFLATED
            with archive.open(member, "w", force_zip64=True) as handle:
                np.lib.format.write_array(handle, array, allow_pickle=False)


def write_dataset(
    wafers: Iterable[Wafer],
    out_dir: Path,
    params: DatasetParams,
    seed: int,
) -> pd.DataFrame:
    """Write wafers as a dataset directory; the directory appears whole or not at all."""
    out_dir = Path(out_dir)
    recover_directory(out_dir)  # its callers hold the workspace's DVC or nightly lock: no other writer
    staging = staging_directory(out_dir)
    try:
        (staging / SHARD_DIR).mkdir()
        rows: list[dict] = []
        buffer: list[Wafer] = []
        seen: dict[tuple[str, str], object] = {}
        shard, offset = 0, 0
        for wafer in wafers:
            key = (wafer.lot_id, wafer.wafer_id)
            if key in seen:
                raise WaferError(wafer.source, f"duplicate wafer in dataset input (also in {seen[key]})", *key)
            seen[key] = wafer.source
            rows.append(_index_row(wafer, shard, offset))
            buffer.append(wafer)
            offset += wafer.map.size
            if len(buffer) == params.shard_wafers:
                _write_shard(staging / SHARD_DIR, shard, buffer)
                buffer, shard, offset = [], shard + 1, 0
        if buffer:
            _write_shard(staging / SHARD_DIR, shard, buffer)
        if not rows:
            raise ValueError(f"{out_dir}: no wafers to write")
        index = pd.DataFrame(rows)
        index.insert(2, "split", index["lot_id"].map(assign_splits(index["lot_id"], params.split, seed)))
        index.to_parquet(staging / INDEX_FILE, index=False)
        replace_directory(staging, out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    log.info("wrote %d wafers in %d shards to %s", len(index), index["shard"].nunique(), out_dir)
    return index


class WaferDataset:
    """Read access to a dataset directory: the index table and wafers by position or split."""

    def __init__(self, root: Path | str):
        self.root = Path(root)
        index_path = self.root / INDEX_FILE
        if not index_path.is_file():
            raise FileNotFoundError(f"{self.root}: not a waferseg dataset (no {INDEX_FILE})")
        self.index = pd.read_parquet(index_path)

    def __len__(self) -> int:
        return len(self.index)

    @lru_cache(maxsize=4)  # noqa: B019 - a dataset object lives as long as its shards are read
    def _shard(self, number: int) -> tuple[np.ndarray, np.ndarray]:
        with np.load(self.root / SHARD_DIR / f"shard-{number:05d}.npz") as data:
            return data["maps"], data["masks"]

    def wafer(self, position: int) -> Wafer:
        row = self.index.iloc[position]
        maps, masks = self._shard(int(row["shard"]))
        size = int(row["rows"]) * int(row["cols"])
        start = int(row["offset"])
        shape = (int(row["rows"]), int(row["cols"]))
        wafer_map = maps[start : start + size].reshape(shape)
        mask = masks[start : start + size].reshape(shape) if row["has_mask"] else None
        source = self.root / SHARD_DIR / f"shard-{int(row['shard']):05d}.npz"
        return validate_wafer(row["lot_id"], row["wafer_id"], wafer_map, mask, source=source,
                              label=row["label"] if isinstance(row["label"], str) else None)

    def positions(self, split: str | None = None) -> np.ndarray:
        if split is None:
            return np.arange(len(self.index))
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        return np.flatnonzero(self.index["split"].to_numpy() == split)

    def wafers(self, split: str | None = None, with_origin: bool = False) -> Iterator[Wafer]:
        """Wafers in index order; with_origin gives each the source it was first read from (as recorded)."""
        origins = self.index["source"] if with_origin and "source" in self.index else None
        for position in self.positions(split):
            wafer = self.wafer(int(position))
            yield replace(wafer, source=origins.iloc[position]) if origins is not None else wafer


def merge_datasets(sources: Iterable[Path], out_dir: Path, params: DatasetParams, seed: int) -> pd.DataFrame:
    """The `split` stage: the wafers of every source dataset that exists, in one dataset split per lot.

    Each wafer keeps the source it first came from; a wafer id in two sources is an error naming both."""
    present = [Path(s) for s in sources if (Path(s) / INDEX_FILE).is_file()]
    for missing in set(map(Path, sources)) - set(present):
        log.info("split: %s has no dataset yet, left out", missing)
    if not present:
        raise FileNotFoundError(f"{out_dir}: none of the source datasets exists ({', '.join(map(str, sources))})")
    return write_dataset((w for s in present for w in WaferDataset(s).wafers(with_origin=True)), out_dir, params, seed)


def dataset_stats(index: pd.DataFrame) -> pd.DataFrame:
    """Per split: lots, wafers, dies, fail share, and for each class the wafers carrying it and its dies."""
    labelled = index[index["has_mask"]]
    table = index.groupby("split").agg(lots=("lot_id", "nunique"), wafers=("wafer_id", "size"),
                                       dies=("n_dies", "sum"), fails=("n_fail", "sum"))
    table["fail_share"] = (table["fails"] / table["dies"]).round(4)
    for name in CLASS_NAMES[1:]:
        carrying = labelled[f"dies_{name}"] > 0
        table[f"wafers_{name}"] = carrying.groupby(labelled["split"]).sum()
        table[f"dies_{name}"] = labelled[f"dies_{name}"].groupby(labelled["split"]).sum()
    table = table.reindex([s for s in SPLITS if s in table.index]).fillna(0)
    table.loc["all"] = table.sum(numeric_only=True)
    table.loc["all", "fail_share"] = round(table.loc["all", "fails"] / max(table.loc["all", "dies"], 1), 4)
    return table.astype({c: "int64" for c in table.columns if c != "fail_share"})

