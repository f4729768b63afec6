"""Tiny real labelled sets for tests: the first rows of each shipped wafer table, with their recorded splits."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq

from pipeline.params import RealParams
from pipeline.realdata import write_splits

REAL_DATA = Path(__file__).resolve().parents[1] / "real_data"
SHIPPED = {"wm811k": REAL_DATA / "wm811k" / "wm811k_labelled.parquet",
           "mixedwm38": REAL_DATA / "mixedwm38" / "mixedwm38.parquet"}


def tiny_real(root: Path, wafers: int = 80, max_side: int = 52, relative_to: Path | None = None) -> dict:
    """params.yaml's `real` block for `wafers` small real wafers of each set, written under `root`; with
    `relative_to`, its paths are relative to that directory (a workspace's params.yaml, DVC's deps)."""
    root.mkdir(parents=True, exist_ok=True)
    sets = {}
    for name, path in SHIPPED.items():
        table = pq.read_table(path)
        small = [i for i, (r, c) in enumerate(zip(table["rows"].to_pylist(), table["cols"].to_pylist()))
                 if max(r, c) <= max_side]
        small = small[:: len(small) // wafers][:wafers]  # spread over the file: the labels come in runs
        pq.write_table(table.take(small), root / f"{name}.parquet")
        sets[name] = {"path": str(root / f"{name}.parquet"), "per_label": 8, "min_per_label": 2}
    block = {"sets": sets, "splits_dir": str(root / "splits"), "reports_dir": str(root / "reports")}
    write_splits(RealParams.model_validate(block))
    if relative_to is not None:
        def relative(path: str) -> str:
            return str(Path(path).relative_to(relative_to))

        block = {"sets": {n: {**s, "path": relative(s["path"])} for n, s in sets.items()},
                 "splits_dir": relative(block["splits_dir"]), "reports_dir": relative(block["reports_dir"])}
    return block
