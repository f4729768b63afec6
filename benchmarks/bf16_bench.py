"""fp32 vs bf16-autocast FCN-8s on CPU: training steps/s and inference wafers/s (64x64, batch 16).

Each configuration runs in its own subprocess, so a crashing one is reported, not fatal:
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bf16_bench.py [--widths 0.25 1] [--budget 20]
Prints a markdown table; one JSON line per configuration goes to stderr as it finishes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from pipeline.model import FCN, encode_maps

log = logging.getLogger("bf16_bench")

# (label, bf16 autocast, channels_last, full 7x7 fc6 as before the dead-tap trim)
VARIANTS = [
    ("fp32", False, False, False),
    ("fp32 channels_last", False, True, False),
    ("bf16 autocast + channels_last", True, True, False),
    ("fp32, plain 7x7 fc6 (before Fc6)", False, False, True),
]


def measure(width: float, mode: str, autocast: bool, channels_last: bool, full_fc6: bool, budget: float, batch: int) -> dict:
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = FCN("fcn8s", width).train(mode == "train").to(memory_format=fmt)
    if full_fc6:
        fc6 = model.fc[0]
        fc6.forward = lambda x: F.conv2d(x, fc6.weight, fc6.bias, padding=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    maps = torch.randint(0, 3, (batch, 64, 64))
    x = encode_maps(maps).to(memory_format=fmt)
    target = torch.randint(0, 5, (batch, 64, 64))

    def step() -> None:
        if mode == "train":
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = F.cross_entropy(model(x).float(), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        else:
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                model(x).argmax(dim=1)

    step()  # warm-up: oneDNN primitive creation, weight casts
    times: list[float] = []
    while not times or (sum(times) < budget and len(times) < 50):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    seconds = sorted(times)[len(times) // 2]  # median: the VM's neighbours add noise
    return {"iters": len(times), "seconds": seconds, "steps_per_s": 1 / seconds, "wafers_per_s": batch / seconds}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--widths", type=float, nargs="+", default=[0.25, 1.0])
    parser.add_argument("--modes", nargs="+", default=["train", "infer"])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--budget", type=float, default=20.0, help="seconds of timed iterations per configuration")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.one:
        print(json.dumps(measure(**json.loads(args.one), budget=args.budget, batch=args.batch)))
        return

    rows = []
    env = {**os.environ, "PYTHONPATH": "."}
    for width in args.widths:
        for mode in args.modes:
            for label, autocast, channels_last, full_fc6 in VARIANTS:
                if full_fc6 and mode == "infer":
                    continue
                config = dict(width=width, mode=mode, autocast=autocast, channels_last=channels_last, full_fc6=full_fc6)
                cmd = [sys.executable, __file__, "--one", json.dumps(config), "--budget", str(args.budget), "--batch", str(args.batch)]
                try:
                    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
                    result = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else {"rc": proc.returncode}
                except subprocess.TimeoutExpired:
                    result = {"rc": "timeout"}
                log.info(json.dumps({**config, **result}))
                rows.append((width, mode, label, result))

    print(f"| width | mode | path | s/iter (median) | steps/s | wafers/s |  # batch {args.batch}, 64x64, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '?')}")
    print("| --- | --- | --- | ---: | ---: | ---: |")
    for width, mode, label, r in rows:
        if "seconds" in r:
            print(f"| {width:g} | {mode} | {label} | {r['seconds']:.3f} | {r['steps_per_s']:.3f} | {r['wafers_per_s']:.1f} |")
        else:
            print(f"| {width:g} | {mode} | {label} | failed: rc={r['rc']} | | |")


if __name__ == "__main__":
    main()
