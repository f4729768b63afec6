"""Where a training step's time goes, and training throughput by batch size, on one epoch's draw of the CPU
profile (the synthetic train split and the stratified real sample): batch assembly, augmentation, forward,
loss, backward and optimizer step, over the first 2,400 wafers of the epoch.

    .venv/bin/python benchmarks/train_step_profile.py --batch 64 --batch 16
    .venv/bin/python benchmarks/train_step_profile.py --batch 16 --variant fp32-eager --variant default --rounds 3

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
from pipeline.device import cpu_name
from pipeline.model import autocast_context, build_model
from pipeline.params import load_params, resolve_profile
from pipeline.predict import bucket_batches, model_input

WAFERS = 2400


VARIANTS = {  # name: (fused AdamW, channels_last, bf16 autocast where bf16_allowed for training)
    "fp32-eager": (False, False, False),
    "default": (True, True, False),
    "default+bf16": (True, True, True),
}


def profile(params, examples: list, batch: int, variant: str = "default") -> dict:
    fused, channels_last, bf16 = VARIANTS[variant]
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    batches = bucket_batches([e.wafer.shape for e in examples], batch, rng)[: WAFERS // batch]
    model = build_model(params.model).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = train.make_optimizer(model, params.train, fused=fused)
    weights = torch.ones(5)
    seconds: dict[str, float] = collections.defaultdict(float)
    for positions in batches:
        marks = [time.perf_counter()]
        maps, targets, present, allowed = train.training_batch([examples[i] for i in positions])
        marks.append(time.perf_counter())
        maps, targets = train.augment_batch(maps, targets)
        marks.append(time.perf_counter())
        with autocast_context("cpu", training=True, enabled=bf16):
            logits = model(model_input(maps, "cpu", channels_last))
            marks.append(time.perf_counter())
            loss = train.training_loss(logits.float(), maps, targets, present, allowed, weights, params)
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
    return {"variant": variant, "batch": batch, "wafers": wafers, "wafers_per_s": round(wafers / total, 1),
            "share": {name: round(value / total, 3) for name, value in seconds.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, action="append", required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variant", action="append", choices=list(VARIANTS),
                        help="training paths to time in turn (default: default); fp32-eager is the baseline")
    parser.add_argument("--rounds", type=int, default=1, help="alternate the variants this many times")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    params = resolve_profile(load_params(), "cpu")
    dataset = WaferDataset(params.dataset.dir)
    real = realdata.load_real_sets(params.real)
    synthetic = [train.dataset_example(w) for w in dataset.wafers("train")]
    real_examples = {name: {"train": [train.real_example(w) for w in s["train"]]} for name, s in real.items()}
    examples = train.epoch_examples(params, synthetic, real_examples, np.random.default_rng(0))
    for _ in range(args.rounds):
        for batch in args.batch:
            for variant in args.variant or ["default"]:
                print(json.dumps({**profile(params, examples, batch, variant), "threads": args.threads,
                                  "host": cpu_name()}), flush=True)


if __name__ == "__main__":
    main()
