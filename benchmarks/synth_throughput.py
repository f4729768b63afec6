"""Synthetic generator throughput on one core, and (optionally) its calibration against real wafers.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/synth_throughput.py
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/synth_throughput.py \
        --real real_data/wm811k/unlabeled_lots.parquet --png reports/synth_vs_real.png

Throughput counts generation only (wafers are consumed and dropped). The calibration loads the die table
with a small pandas grouping, so it does not depend on pipeline.io.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.params import SynthParams
from pipeline.synth import compare_real, generate, plot_comparison

WARMUP_WAFERS = 500


def wafers_per_second(params: SynthParams, n: int, seed: int, shape: tuple[int, int] | None) -> float:
    for _ in generate(params, seed + 1, WARMUP_WAFERS, shape=shape):
        pass
    start = time.perf_counter()
    count = sum(1 for _ in generate(params, seed, n, shape=shape))
    return count / (time.perf_counter() - start)


def die_table_maps(path: Path) -> list[np.ndarray]:
    """Wafer maps from a die table (lot_id, wafer_id, row, col, bin); shape = max row + 1, max col + 1."""
    table = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    maps = []
    for _, dies in table.groupby(["lot_id", "wafer_id"], sort=True):
        rows, cols, bins = (dies[c].to_numpy() for c in ("row", "col", "bin"))
        wafer_map = np.zeros((rows.max() + 1, cols.max() + 1), dtype=np.uint8)
        wafer_map[rows, cols] = bins
        maps.append(wafer_map)
    return maps


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=20_000, help="wafers timed per case")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--real", type=Path, help="die table of real wafers to calibrate against")
    parser.add_argument("--synth-n", type=int, default=5_000, help="synthetic wafers for the calibration")
    parser.add_argument("--png", type=Path, default=Path("reports/synth_vs_real.png"))
    args = parser.parse_args()

    params = SynthParams()
    print(f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '<unset>')}, numpy {np.__version__}")
    for label, shape in (("64x64", (64, 64)), ("default size distribution", None)):
        rate = wafers_per_second(params, args.n, args.seed, shape)
        print(f"{label:>26}: {rate:8.0f} wafers/s ({args.n} wafers)")

    if args.real:
        real = die_table_maps(args.real)
        synth = list(generate(params, args.seed, args.synth_n))
        with pd.option_context("display.width", 200, "display.max_columns", 20, "display.precision", 3):
            print(f"\ncalibration: {len(real)} real wafers ({args.real.name}) "
                  f"vs {len(synth)} synthetic (seed {args.seed})")
            print(compare_real(real, synth))
        print(f"plot: {plot_comparison(real, synth, args.png)}")


if __name__ == "__main__":
    main()
