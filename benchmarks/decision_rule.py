"""The wafer-level decision's calibration compared on one model's weights: every offset 0; one offset per class
for presence and claims alike, fitted to the real val scores alone (the rule before 2026-12-06) or with the
synthetic val mIoU averaged in (`patterns.calibrate_masks`); and a shared offset with a claim delta per class
(`patterns.calibrate_claims`), without and with the masks. Each is calibrated by the product's `train.calibrate`
on all of real val (and the synthetic val split) and scored on real val and test by `evaluate.evaluate_real` and
on the synthetic test split by `evaluate.evaluate_model` (the masks the reports get); no training. Needs the
synthetic dataset (`waferseg generate && waferseg split`).

    .venv/bin/python benchmarks/decision_rule.py --model pretrained/fcn8s-cpu-full.pt

Writes benchmarks/results/decision-rule.json and .md.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from pipeline import checkpoint, real_eval
from pipeline.device import cpu_name
from pipeline.dataset import WaferDataset
from pipeline.evaluate import evaluate_model, evaluate_real
from pipeline.params import load_params
from pipeline.realdata import load_real_sets
from pipeline.train import calibrate

RESULTS = Path(__file__).parent / "results"
RULES = {  # name: (calibrate_claims, calibrate_masks), or None for every offset 0
    "uncalibrated (every offset 0)": None,
    "one offset per class, real val": (False, False),
    "one offset per class, real val + synthetic mIoU": (False, True),
    "shared offset + claim delta, real val": (True, False),
    "shared offset + claim delta, real val + synthetic mIoU": (True, True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="a weights file (checkpoint.save_model)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    params = load_params()
    real = load_real_sets(params.real)
    model = checkpoint.model_from(checkpoint.read(args.model, args.model), device)
    dataset = WaferDataset(params.dataset.dir)
    synthetic_val, synthetic_test = ([w for w in dataset.wafers(split) if w.mask is not None] for split in ("val", "test"))
    rows = []
    for rule, switches in RULES.items():
        claims, masks = switches or (False, False)
        update = {"calibrate_claims": claims, "calibrate_masks": masks}
        ruled = params.model_copy(update={"patterns": params.patterns.model_copy(update=update)})
        started = time.perf_counter()
        if switches is None:
            model.pattern_offsets.zero_()
            calibration = {}
        else:
            calibration = calibrate(model, {name: sets["val"] for name, sets in real.items()}, ruled, device, amp=False,
                                    synthetic_val=synthetic_val)
        seconds = time.perf_counter() - started
        scores = {split: {name: real_eval.headline(s) for name, s in
                          evaluate_real(model, {n: r[split] for n, r in real.items()}, ruled, device).items()}
                  for split in ("val", "test")}
        _, synthetic = evaluate_model(model, synthetic_test, params.infer.batch_wafers, device)
        rows.append({"rule": rule, "calibration_seconds": round(seconds, 1), "offsets": model.pattern_offsets.tolist(),
                     "calibration": calibration, "scores": scores, "synthetic_test_miou": synthetic["miou"],
                     "synthetic_test_iou": synthetic["iou"]})
    record = {"model": str(args.model), "host": cpu_name(), "threads": args.threads, "rules": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "decision-rule.json").write_text(json.dumps(record, indent=2, default=float))
    (RESULTS / "decision-rule.md").write_text(table_md(record))
    print(table_md(record))


def table_md(record: dict) -> str:
    lines = [f"Model `{record['model']}`, host {record['host']}, {record['threads']} threads.", "",
             "| rule | offsets (presence / claims: ring, scratch, local_zone, circle) | split | WM-811K bal. acc. "
             "| false alarms | lowest recall | MixedWM38 exact | synthetic test mIoU |",
             "|---|---|---|---:|---:|---|---:|---:|"]
    for row in record["rules"]:
        presence, claims = row["offsets"]
        for split, scores in row["scores"].items():
            wm, mixed = scores["wm811k"], scores["mixedwm38"]
            label, recall = min(wm["recall"].items(), key=lambda item: item[1])
            lines.append(f"| {row['rule']} | {presence} / {claims} | {split} | {wm['balanced_accuracy']:.4f} "
                         f"| {wm['false_alarm_rate']:.4f} | {label} {recall:.3f} | {mixed['exact_match']:.4f} "
                         f"| {row['synthetic_test_miou']:.4f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
