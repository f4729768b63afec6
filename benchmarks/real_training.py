"""How FCN-8s learns from the real wafers: one training run of `train.fit` on the synthetic dataset and the
shipped real sets with params overrides, scored on real val and test. The README's comparison table is made of
these runs.

    .venv/bin/python benchmarks/real_training.py '{"train.epochs": 6, "model.dropout": 0.1}' --name dropout01

Overrides are dotted keys of params.yaml (a section's whole sub-block may be given as a mapping). Needs the
synthetic training set (`waferseg generate && waferseg split`). Writes benchmarks/results/real-training/NAME.json
with the per-epoch history, the calibration and the val/test scores; nothing is registered.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from pipeline import checkpoint, real_eval
from pipeline.dataset import WaferDataset
from pipeline.evaluate import evaluate_model, evaluate_real
from pipeline.device import cpu_name
from pipeline.params import Params, load_params, resolve_profile
from pipeline.realdata import load_real_sets
from pipeline.train import fit

RESULTS = Path(__file__).parent / "results" / "real-training"


def with_overrides(params: Params, overrides: dict) -> Params:
    data = params.model_dump()
    for dotted, value in overrides.items():
        *path, key = dotted.split(".")
        node = data
        for part in path:
            node = node[part]
        node[key] = value
    return Params.model_validate(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="?", default="{}", help="JSON object of dotted params keys")
    parser.add_argument("--name", required=True)
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--save", type=Path, help="write the trained, calibrated model here (checkpoint.save_model)")
    parser.add_argument("--init", type=Path, help="start from this checkpoint's (best) weights, as a warm start does")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    overrides = json.loads(args.overrides)
    params = with_overrides(resolve_profile(load_params(), args.profile), overrides)
    real = load_real_sets(params.real)
    initial = checkpoint.model_from(checkpoint.read(args.init, args.init), torch.device("cpu")) if args.init else None
    started = time.perf_counter()
    result = fit(params, WaferDataset(params.dataset.dir), model=initial,
                 real={name: {"train": s["train"], "val": s["val"]} for name, s in real.items()})
    seconds = time.perf_counter() - started
    if args.save:
        checkpoint.save_model(args.save, result.model, params)
    dataset = WaferDataset(params.dataset.dir)
    test = [w for w in dataset.wafers("test") if w.mask is not None]
    _, synthetic = evaluate_model(result.model, test, params.infer.batch_wafers, result.device)
    full = {split: evaluate_real(result.model, {n: r[split] for n, r in real.items()}, params, result.device)
            for split in ("val", "test")}
    scores = {split: {name: real_eval.headline(s) for name, s in by_set.items()} for split, by_set in full.items()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    record = {"name": args.name, "overrides": overrides, "profile": args.profile, "host": cpu_name(),
              "init": str(args.init) if args.init else None,
              "threads": args.threads, "fit_seconds": round(seconds, 1), "history": result.state.history,
              "calibration": result.calibration, "synthetic_test_miou": synthetic["miou"], "real": scores,
              "val_details": full["val"]}  # confusions and most-confused sets: tuning reads val only
    (RESULTS / f"{args.name}.json").write_text(json.dumps(record, indent=2, default=float))
    print(json.dumps({k: record[k] for k in ("name", "fit_seconds", "synthetic_test_miou", "real")}, indent=1))


if __name__ == "__main__":
    main()
