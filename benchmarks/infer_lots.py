"""`waferseg infer` on the 837 real WM-811K lots (1,465 wafers, a wafer or two a lot): per-lot costs dominate.

    .venv/bin/python benchmarks/infer_lots.py --model pretrained/fcn8s-cpu-full.pt [--repeats 3] [--name NAME]

Each repeat reports every lot into a fresh directory (model load, reading, the model, every lot report with
its fsyncs, the index), as `make run`'s infer task does on a fresh clone. Writes
benchmarks/results/infer-lots[-NAME].json with each repeat's seconds and wafers/s and the host.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

from pipeline.infer import infer
from pipeline.device import cpu_name
from pipeline.params import load_params

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint or models:/ URI")
    parser.add_argument("--source", type=Path, default=Path("real_data/wm811k/unlabeled_lots.parquet"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--name", default="")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    params = load_params()
    runs = []
    for _ in range(args.repeats):
        out = Path(tempfile.mkdtemp(prefix="waferseg-lots-"))
        started = time.perf_counter()
        summary = infer(args.source, out, params, model_uri=args.model, named=True)
        seconds = time.perf_counter() - started
        runs.append({"seconds": round(seconds, 2), "wafers": summary.read, "lots": summary.lots_reported,
                     "wafers_per_s": round(summary.read / seconds, 1)})
        print(json.dumps(runs[-1]), flush=True)
        shutil.rmtree(out)
    record = {"host": cpu_name(), "model": args.model, "source": str(args.source), "runs": runs,
              "best_wafers_per_s": max(r["wafers_per_s"] for r in runs)}
    name = f"infer-lots-{args.name}" if args.name else "infer-lots"
    (RESULTS / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
