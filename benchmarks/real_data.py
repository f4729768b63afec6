"""FCN-8s on real WM-811K wafers: label vs predicted pattern on sub100.csv, the pattern mix of the 1,465
unlabeled real wafers, and 16 example overlays.

    .venv/bin/python benchmarks/real_data.py --model models/fcn8s.pt

WM-811K labels are per wafer (no die masks), so the comparison is the wafer's label against the dominant
predicted pattern (`patterns.wafer_patterns`, infer.min_pattern_dies). Writes
benchmarks/results/real-data.{json,md} and docs/real_overlays.png.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline import viz
from pipeline.io import read_wafers
from pipeline.labels import expected_dominant
from pipeline.params import load_params
from pipeline.patterns import wafer_patterns
from pipeline.predict import predict_wafers
from pipeline.registry import load_model
from pipeline.wafer import CLASS_NAMES

DATA = Path(__file__).resolve().parents[1] / "real_data" / "wm811k"
RESULTS = Path(__file__).parent / "results"
OVERLAYS = Path(__file__).resolve().parents[1] / "docs" / "real_overlays.png"
PATTERNS = ["none", *CLASS_NAMES[1:]]
PER_PATTERN = 4  # overlays per predicted pattern: 4 x 4 = 16


def predicted_patterns(model, wafers, params, device) -> tuple[list[np.ndarray], list[str]]:
    masks = predict_wafers(model, wafers, params.infer.batch_wafers, device, params.infer.amp,
                           params.infer.channels_last)
    return masks, [wafer_patterns(m, w.map, params.infer.min_pattern_dies)[1] for m, w in zip(masks, wafers)]


def overlay_examples(wafers, masks, patterns) -> list[list[tuple[str, np.ndarray]]]:
    """Up to PER_PATTERN wafers of each defect pattern, one pattern per row, in input order."""
    rows = []
    for pattern in CLASS_NAMES[1:]:
        picked = [i for i, p in enumerate(patterns) if p == pattern][:PER_PATTERN]
        rows.append([(f"{wafers[i].lot_id}/{wafers[i].wafer_id}: {pattern}", viz.colour_dies(wafers[i].map, masks[i]))
                     for i in picked])
    return [row for row in rows if row]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint or models:/ URI")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--data", type=Path, default=DATA)
    args = parser.parse_args()
    params = load_params(args.params)
    device = torch.device("cpu")
    model, version = load_model(args.model, params.registry, device)
    if params.infer.channels_last:
        model = model.to(memory_format=torch.channels_last)

    labelled = [w for w in read_wafers(args.data / "sub100.csv") if w.label is not None]
    _, predicted = predicted_patterns(model, labelled, params, device)
    expected = [expected_dominant(w.label) for w in labelled]
    confusion = pd.crosstab(pd.Series(expected, name="WM-811K label"),
                            pd.Series(predicted, name="predicted"))
    confusion = confusion.reindex(columns=[p for p in PATTERNS if p in confusion.columns or p == "none"],
                                  fill_value=0)
    agree = sum(e == p for e, p in zip(expected, predicted))

    unlabeled = read_wafers(args.data / "unlabeled_lots.parquet")
    masks, patterns = predicted_patterns(model, unlabeled, params, device)
    mix = Counter(patterns)
    viz.save_wafer_grid(overlay_examples(unlabeled, masks, patterns), OVERLAYS,
                        title=f"real WM-811K wafers, predicted by {version}")

    result = {"model": version, "sub100_labelled": len(labelled), "sub100_agree": agree,
              "sub100_confusion": {label: row.to_dict() for label, row in confusion.iterrows()},
              "unlabeled_wafers": len(unlabeled), "unlabeled_pattern_mix": {p: mix.get(p, 0) for p in PATTERNS},
              "overlays": str(OVERLAYS.relative_to(OVERLAYS.parents[1]))}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "real-data.json").write_text(json.dumps(result, indent=2))
    lines = [f"# FCN-8s on real WM-811K wafers (model {version})", "",
             f"sub100.csv: {len(labelled)} labelled wafers; the dominant predicted pattern matches the label "
             f"for {agree} ({agree / len(labelled):.0%}). Rows: WM-811K label (mapped: Edge-Loc/Loc -> local_zone, "
             "Center -> circle); columns: predicted dominant pattern.", "",
             "| label | " + " | ".join(confusion.columns) + " |", "|---|" + "---:|" * len(confusion.columns)]
    lines += [f"| {label} | " + " | ".join(str(int(v)) for v in row) + " |" for label, row in confusion.iterrows()]
    lines += ["", f"unlabeled_lots.parquet: {len(unlabeled)} real wafers, predicted dominant pattern:", "",
              "| " + " | ".join(PATTERNS) + " |", "|" + "---:|" * len(PATTERNS),
              "| " + " | ".join(str(mix.get(p, 0)) for p in PATTERNS) + " |"]
    (RESULTS / "real-data.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
