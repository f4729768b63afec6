"""The real labelled sets that ship with the project (real_data/): fixed splits and per-epoch samples.

Neither WM-811K excerpt nor MixedWM38 names lots, so a wafer's split follows from a hash of its map:
identical maps always fall on one side, the split of a wafer never changes when others are added, and
the recorded split files (real_data/splits/) let anyone check that nothing moved.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from pipeline import io
from pipeline.labels import normalise_label
from pipeline.params import RealParams, RealSetParams, SplitParams
from pipeline.wafer import Wafer

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
SPLIT_COLUMNS = ["wafer_id", "split"]
RealWafers = dict[str, dict[str, list[Wafer]]]  # real set name -> split -> wafers


def split_of_map(rows: int, cols: int, map_bytes: bytes, split: SplitParams) -> str:
    """train/val/test from the map's content alone: the first 8 bytes of its sha256 as a fraction in [0, 1)."""
    digest = hashlib.sha256(f"{rows}x{cols}:".encode() + bytes(map_bytes)).digest()
    share = int.from_bytes(digest[:8], "big") / 2**64
    if share < split.train:
        return "train"
    return "val" if share < split.train + split.val else "test"


def compute_splits(table: Path, split: SplitParams) -> pd.DataFrame:
    """(wafer_id, split) for every row of a wafer table, in file order."""
    frame = pq.read_table(table, columns=["wafer_id", "rows", "cols", "map"]).to_pandas()
    frame["split"] = [split_of_map(r, c, m, split) for r, c, m in zip(frame["rows"], frame["cols"], frame["map"])]
    return frame[SPLIT_COLUMNS]


def split_file(params: RealParams, name: str) -> Path:
    return params.splits_dir / f"{name}.csv"


def write_splits(params: RealParams) -> dict[str, pd.DataFrame]:
    """Compute and record the split of every real set (`waferseg real-splits`)."""
    params.splits_dir.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, real_set in params.sets.items():
        splits = compute_splits(real_set.path, params.split)
        splits.to_csv(split_file(params, name), index=False)
        log.info("%s: %s", name, splits["split"].value_counts().to_dict())
        out[name] = splits
    return out


def read_splits(params: RealParams, name: str) -> pd.Series:
    """wafer_id -> split as recorded; a wafer of the data that the record lacks is an error."""
    path = split_file(params, name)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no recorded split for the real set {name!r}; run `waferseg real-splits`")
    return pd.read_csv(path, dtype=str).set_index("wafer_id")["split"]


def load_real_set(params: RealParams, name: str, splits: Iterable[str] = SPLITS) -> dict[str, list[Wafer]]:
    """The wafers of one real set by split, labels normalised; each checked against its recorded split."""
    real_set = params.sets[name]
    recorded = read_splits(params, name)
    wanted = set(splits)
    out: dict[str, list[Wafer]] = {split: [] for split in SPLITS if split in wanted}
    for wafer in io.read_wafers(real_set.path, named=True):  # a path the user set in params.yaml
        split = recorded.get(wafer.wafer_id)
        if split is None:
            raise ValueError(f"{real_set.path}: wafer {wafer.wafer_id} has no recorded split in "
                             f"{split_file(params, name)}; run `waferseg real-splits`")
        if split in out:
            out[split].append(wafer)
    log.info("%s: %s", name, {split: len(wafers) for split, wafers in out.items()})
    return out


def epoch_sample(wafers: list[Wafer], real_set: RealSetParams, rng: np.random.Generator) -> list[int]:
    """Positions of one epoch's share of a real train split, stratified by label: each label gives
    min(its wafers, per_label) wafers without replacement, and rare labels are drawn up to min_per_label
    with replacement, so 111 Near-full wafers weigh against 29,294 none."""
    labels = pd.Series([normalise_label(w.label) for w in wafers])
    picked: list[np.ndarray] = []
    for _, positions in labels.groupby(labels).indices.items():
        n = len(positions)
        take = n if real_set.per_label is None else min(n, real_set.per_label)
        picked.append(rng.choice(positions, take, replace=False))
        if take < real_set.min_per_label:
            picked.append(rng.choice(positions, real_set.min_per_label - take, replace=True))
    return np.concatenate(picked).tolist() if picked else []


def load_real_sets(params: RealParams) -> RealWafers:
    """Every real set's train, val and test wafers (their recorded splits)."""
    return {name: load_real_set(params, name) for name in params.sets}
