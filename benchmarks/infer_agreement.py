"""Does `infer`'s fast path decide what fp32 decides? Masks of the real val wafers (WM-811K and MixedWM38) from the
path `infer` runs (BatchNorm folded into the convs, bf16 autocast where `bf16_allowed`, channels_last) against
plain fp32 eager with the unfolded model; the wafer-level patterns too.

    .venv/bin/python benchmarks/infer_agreement.py --model pretrained/fcn8s-cpu-full.pt

Writes benchmarks/results/infer-agreement.json. The issue's floor: masks agree on >= 99.9 % of on-wafer dies.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import torch

from pipeline.device import cpu_name
from pipeline.infer import inference_model
from pipeline.model import bf16_allowed
from pipeline.params import load_params
from pipeline.predict import predict_wafers
from pipeline.realdata import load_real_sets
from pipeline.registry import load_model
from pipeline.wafer import OFF_WAFER

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint or models:/ URI")
    parser.add_argument("--split", default="val")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    params = load_params()
    cpu = torch.device("cpu")
    model, version = load_model(args.model, params.registry, cpu)
    fast, _ = inference_model(args.model, params, cpu)  # exactly the model `infer` runs
    batch = params.infer.batch_wafers
    record = {"host": cpu_name(), "model": version, "split": args.split, "bf16": bf16_allowed(cpu, training=False),
              "sets": {}}
    for name, splits in load_real_sets(params.real).items():
        wafers = splits[args.split]
        reference = predict_wafers(model, wafers, batch, cpu, amp=False, channels_last=False)
        answer = predict_wafers(fast, wafers, batch, cpu, amp=params.infer.amp,
                                channels_last=params.infer.channels_last)
        on_wafer = same = wafer_same = 0
        for w, r, a in zip(wafers, reference, answer):
            dies = w.map != OFF_WAFER
            on_wafer += int(dies.sum())
            same += int((r == a)[dies].sum())
            wafer_same += set(np.unique(r[dies])) == set(np.unique(a[dies]))
        record["sets"][name] = {"wafers": len(wafers), "agreement_on_wafer": round(same / on_wafer, 6),
                                "same_classes_present": round(wafer_same / len(wafers), 6)}
        print(name, json.dumps(record["sets"][name]), flush=True)
    (RESULTS / "infer-agreement.json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
