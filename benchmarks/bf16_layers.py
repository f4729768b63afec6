"""Forward + backward of each FCN layer alone under bf16 autocast, to find a layer that corrupts the heap.

Each layer runs in its own subprocess (MALLOC_CHECK_=3, timeout), so a crash names its layer:
    .venv/bin/python benchmarks/bf16_layers.py --width 1 --batch 8 --size 64 [--channels-last] [--fp32]
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import subprocess
import sys
import time

import torch

from pipeline.model import FCN, encode_maps

log = logging.getLogger("bf16_layers")


def layer_inputs(model: FCN, x: torch.Tensor) -> dict[str, tuple[torch.nn.Module, torch.Tensor]]:
    """Every leaf layer of the model with the (fp32) input it sees in the forward pass."""
    inputs: dict[str, tuple[torch.nn.Module, torch.Tensor]] = {}

    def record(name: str, module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        inputs.setdefault(name, (module, args[0].detach()))

    hooks = [
        module.register_forward_pre_hook(functools.partial(record, name))
        for name, module in model.named_modules()
        if not list(module.children())
    ]
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    return inputs


def run_one(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    model = FCN("fcn8s", args.width).train().to(memory_format=fmt)
    x = encode_maps(torch.randint(0, 3, (args.batch, args.size, args.size))).to(memory_format=fmt)
    module, inp = layer_inputs(model, x)[args.layer]
    inp = inp.clone().requires_grad_(True)
    for _ in range(args.repeats):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not args.fp32):
            out = module(inp)
        out.float().square().mean().backward()
    log.info("ok %s in %s out %s %s", args.layer, tuple(inp.shape), tuple(out.shape), out.dtype)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--fp32", action="store_true")
    parser.add_argument("--layer", help="run this layer here (the driver passes it to each subprocess)")
    parser.add_argument("--timeout", type=float, default=300)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.layer:
        run_one(args)
        return

    model = FCN("fcn8s", args.width)
    names = [name for name, module in model.named_modules() if not list(module.children())]
    env = {**os.environ, "MALLOC_CHECK_": "3", "PYTHONPATH": "."}
    for name in names:
        if isinstance(model.get_submodule(name), torch.nn.ReLU):
            continue
        cmd = [sys.executable, __file__, "--layer", name, *sys.argv[1:]]
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
            status = f"rc={proc.returncode}"
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-1:] or [""]
        except subprocess.TimeoutExpired:
            status, tail = "timeout", [""]
        log.info("%-16s %-10s %6.1fs  %s", name, status, time.perf_counter() - start, tail[0][:150])


if __name__ == "__main__":
    main()
