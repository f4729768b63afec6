"""Many bf16-autocast training steps of FCN-8s on CPU at random batch sizes and map sizes, each run in its own
subprocess, to show a training path does not corrupt the heap (the crash of benchmarks/bf16_training.md).

    .venv/bin/python benchmarks/bf16_stress.py [--steps 30] [--runs 2] [--widths 1 0.25] [--bf16-head]
Each step draws a batch of 8-32 maps of H x W, both 32..224 (larger maps get smaller batches so a
width-1 step stays a few seconds), like the bucketed batches of real training. A run passes if its
subprocess exits 0 after all its steps; any crash shows as a negative rc (the signal) and glibc's message.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.model import FCN, encode_maps

log = logging.getLogger("bf16_stress")
MAX_DIES_PER_BATCH = 16 * 128 * 128  # caps batch x H x W at width 1


def batch_shapes(seed: int, steps: int, width: float) -> list[tuple[int, int, int]]:
    rng = np.random.default_rng(seed)
    shapes = []
    for _ in range(steps):
        height, wide = (int(v) for v in rng.integers(32, 225, size=2))
        batch = int(rng.integers(8, 33))
        if width >= 0.5:
            batch = max(8, min(batch, MAX_DIES_PER_BATCH // (height * wide)))
        shapes.append((batch, height, wide))
    return shapes


def run_steps(args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    model = FCN("fcn8s", args.width).train().to(memory_format=fmt)
    model.fp32_head = not args.bf16_head
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for step, (batch, height, wide) in enumerate(batch_shapes(args.seed, args.steps, args.width)):
        start = time.perf_counter()
        maps = torch.randint(0, 3, (batch, height, wide))
        target = torch.randint(0, 5, (batch, height, wide))
        target[maps == 0] = 255
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(encode_maps(maps).contiguous(memory_format=fmt))
        loss = F.cross_entropy(logits.float(), target, ignore_index=255)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        log.info("step %d batch %d %dx%d loss %.4f %.2fs", step, batch, height, wide, loss.item(),
                 time.perf_counter() - start)
    log.info("ok %d steps", args.steps)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--widths", type=float, nargs="+", default=[1.0, 0.25])
    parser.add_argument("--steps", type=int, default=30, help="steps per run")
    parser.add_argument("--runs", type=int, default=2, help="runs (subprocesses) per width; they alternate channels_last")
    parser.add_argument("--bf16-head", action="store_true", help="score/upsampling head in bf16 too (as it crashed)")
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--width", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--channels-last", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.one:
        run_steps(args)
        return

    env = {**os.environ, "PYTHONPATH": "."}
    total_ok = 0
    for width in args.widths:
        for run in range(args.runs):
            config = ["--width", str(width), "--seed", str(run), "--steps", str(args.steps)]
            config += ["--channels-last"] if run % 2 == 0 else []
            config += ["--bf16-head"] if args.bf16_head else []
            start = time.perf_counter()
            try:
                proc = subprocess.run([sys.executable, __file__, "--one", *config], env=env, capture_output=True,
                                      text=True, timeout=args.timeout)
                status = f"rc={proc.returncode}"
                lines = (proc.stdout + proc.stderr).strip().splitlines()
                steps_done = sum(line.startswith("step ") for line in lines)
                total_ok += steps_done if proc.returncode == 0 else 0
                tail = lines[-1] if lines else ""
            except subprocess.TimeoutExpired:
                status, steps_done, tail = "timeout", 0, ""
            print(f"{' '.join(config):55s} {status:7s} {steps_done:3d} steps {time.perf_counter() - start:6.1f}s  {tail[:120]}",
                  flush=True)
    print(f"steps completed in runs that exited 0: {total_ok}")


if __name__ == "__main__":
    main()
