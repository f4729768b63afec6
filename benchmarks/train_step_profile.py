"""Where a training step's time goes, and training throughput by batch size, on one epoch's draw of the CPU
profile (the synthetic train split and the stratified real sample): batch assembly, augmentation, forward,
loss, backward and optimizer step, over the first 2,400 wafers of the epoch.

    .venv/bin/python benchmarks/train_step_profile.py --batch 64 --batch 16

Needs the synthetic training set (`waferseg generate && waferseg split`). Prints one JSON line per batch size.
"""

from __future__ import annotations

import argparse
import collections
import json
import time

import numpy as np
import torch

from pipeline import realdata, train
from pipeline.dataset import WaferDataset
from pipeline.model import build_model
from pipeline.params import load_params, resolve_profile
from pipeline.predict import bucket_batches, model_input

WAFERS = 2400


def profile(params, examples: list, batch: int) -> dict:
    rng = np.random.default_rng(0)
    batches = bucket_batches([e.wafer.shape for e in examples], batch, rng)[: WAFERS // batch]
    model = build_model(params.model).to(memory_format=torch.channels_last).train()
    optimizer = train.make_optimizer(model, params.train)
    weights = torch.ones(5)
    seconds: dict[str, float] = collections.defaultdict(float)
    for positions in batches:
        marks = [time.perf_counter()]
        maps, targets, present, allowed = train.training_batch([examples[i] for i in positions])
        marks.append(time.perf_counter())
        maps, targets = train.augment_batch(maps, targets)
        marks.append(time.perf_counter())
        logits = model(model_input(maps, "cpu", True))
        marks.append(time.perf_counter())
        loss = train.training_loss(logits, maps, targets, present, allowed, weights, params)
        marks.append(time.perf_counter())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        marks.append(time.perf_counter())
        optimizer.step()
        marks.append(time.perf_counter())
        for name, start, end in zip(("batch", "augment", "forward", "loss", "backward", "step"), marks, marks[1:]):
            seconds[name] += end - start
    total = sum(seconds.values())
    wafers = sum(len(p) for p in batches)
    return {"batch": batch, "wafers": wafers, "wafers_per_s": round(wafers / total, 1),
            "share": {name: round(value / total, 3) for name, value in seconds.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, action="append", required=True)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    params = resolve_profile(load_params(), "cpu")
    dataset = WaferDataset(params.dataset.dir)
    real = realdata.load_real_sets(params.real)
    synthetic = [train.dataset_example(w) for w in dataset.wafers("train")]
    real_examples = {name: {"train": [train.real_example(w) for w in s["train"]]} for name, s in real.items()}
    examples = train.epoch_examples(params, synthetic, real_examples, np.random.default_rng(0))
    for batch in args.batch:
        print(json.dumps({**profile(params, examples, batch), "threads": args.threads}), flush=True)


if __name__ == "__main__":
    main()
