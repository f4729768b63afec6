"""Reproduce oneDNN's AMX bf16 heap overrun (benchmarks/bf16_training.md), each configuration in its own subprocess.

    .venv/bin/python benchmarks/onednn_bf16_crash.py [--width 1] [--batch 8] [--size 64] [--steps 5] [--timeout 300]

oneDNN's AMX bf16 backward-weights of a convolution with a bias, fewer than 16 output channels and more than
2048 input channels, on 2 or more threads, writes past a heap buffer (glibc aborts: `free(): invalid next size`).
Rows: a bare bf16 `F.conv2d` at the crashing point and one step across each edge of that boundary, then whole
FCN-8s bf16-autocast training steps with the shipped fp32 score head and with the head in bf16 (undone here
only). Each row prints ok, crash (signal N) or timeout, next to what the boundary predicts for this host.
The environment passes through, e.g. ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 or ONEDNN_VERBOSE=1.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FC_CHANNELS = 4096  # fc7 width of FCN-8s at width 1: score_fr's input channels are round(4096 * width)
CONV_ROWS = [  # (bias, output channels, input channels, threads): the crashing point, then one change each
    (True, 5, 4096, 2), (False, 5, 4096, 2), (True, 16, 4096, 2), (True, 5, 2048, 2), (True, 5, 4096, 1),
]


def crashes_on_amx(bias: bool, out_channels: int, in_channels: int, threads: int) -> bool:
    return bias and out_channels < 16 and in_channels > 2048 and threads >= 2


def host() -> tuple[list[str], bool]:
    import torch

    cpuinfo = open("/proc/cpuinfo").read()
    model = re.search(r"^model name\s*:\s*(.*)$", cpuinfo, re.M)
    flags = set(re.search(r"^flags\s*:\s*(.*)$", cpuinfo, re.M).group(1).split())
    onednn = re.search(r"(?:MKL-DNN|oneDNN)\s+(v[\d.]+)", torch.__config__.show())
    amx = {"amx_bf16", "amx_tile"} <= flags
    return [
        f"CPU: {model.group(1) if model else '?'}, {os.cpu_count()} logical CPUs",
        "flags: " + ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in ("amx_bf16", "amx_tile", "avx512_bf16")),
        f"torch {torch.__version__}, oneDNN {onednn.group(1) if onednn else '?'}, "
        f"oneDNN bf16 kernels (_is_mkldnn_bf16_supported): {torch.ops.mkldnn._is_mkldnn_bf16_supported()}, "
        f"{'-'.join(platform.libc_ver())}, python {platform.python_version()}",
    ], amx


def child_conv(args: argparse.Namespace) -> None:
    """Forward + backward of one bf16 1x1 convolution on a 2x2 map (score_fr's shape on a 64x64 wafer)."""
    import torch
    import torch.nn.functional as F

    x = torch.randn(args.batch, args.in_channels, 2, 2, dtype=torch.bfloat16)
    x = x.contiguous(memory_format=torch.channels_last)
    weight = (torch.randn(args.out_channels, args.in_channels, 1, 1, dtype=torch.bfloat16) * 0.01).requires_grad_()
    bias = torch.zeros(args.out_channels, dtype=torch.bfloat16, requires_grad=True) if args.bias else None
    for _ in range(args.steps):
        F.conv2d(x, weight, bias).float().square().mean().backward()


def child_model(args: argparse.Namespace) -> None:
    """SGD training steps of FCN-8s under bf16 autocast (forced, whatever model.bf16_allowed says of this host)."""
    import torch
    import torch.nn.functional as F

    from pipeline.model import FCN, encode_maps

    torch.manual_seed(0)
    model = FCN("fcn8s", args.width).train().to(memory_format=torch.channels_last)
    if args.bf16_head:  # undo the fix: the head's convolutions autocast to bf16 again, as when training crashed
        fp32_head = model.head

        def bf16_head(*features: torch.Tensor) -> torch.Tensor:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return fp32_head(*features)

        model.head = bf16_head
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    maps = torch.randint(0, 3, (args.batch, args.size, args.size))
    x = encode_maps(maps).contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, 5, (args.batch, args.size, args.size))
    for _ in range(args.steps):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x).float(), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def run(child: list[str], threads: int, args: argparse.Namespace) -> tuple[str, float, str]:
    """Run this script as one child; its result, seconds and the last line it printed to stderr."""
    common = [f"--{name}={getattr(args, name)}" for name in ("batch", "size", "steps", "width")]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, __file__, *child, *common], env=env, capture_output=True, text=True,
                              timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return "timeout", time.perf_counter() - start, ""
    last = (proc.stderr.strip().splitlines() or [""])[-1][:90]
    if proc.returncode < 0:
        status = f"crash (signal {-proc.returncode}, {signal.Signals(-proc.returncode).name})"
    else:
        status = "ok" if proc.returncode == 0 else f"error (exit {proc.returncode})"
    return status, time.perf_counter() - start, last


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=float, default=1.0,
                        help="FCN-8s width of the model rows (> 0.5 reaches the boundary)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=64, help="map side for the model rows")
    parser.add_argument("--steps", type=int, default=5, help="forward + backward steps per row")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per row")
    parser.add_argument("--child", choices=["conv", "model"], help=argparse.SUPPRESS)
    parser.add_argument("--bias", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out-channels", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--in-channels", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--bf16-head", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        (child_conv if args.child == "conv" else child_model)(args)
        return

    lines, amx = host()
    print("\n".join(lines))
    print(f"{args.steps} steps a row; model rows: FCN-8s width {args.width:g}, batch {args.batch}, "
          f"{args.size}x{args.size} maps, channels_last, SGD\n")
    fc = max(1, round(FC_CHANNELS * args.width))
    rows = [(f"conv {'bias' if bias else 'no bias'}, {oc} out, {ic} in",
             ["--child", "conv", "--out-channels", str(oc), "--in-channels", str(ic)] + (["--bias"] if bias else []),
             threads, crashes_on_amx(bias, oc, ic, threads)) for bias, oc, ic, threads in CONV_ROWS]
    rows += [(f"FCN-8s, {head} head (score_fr {fc} in)",
              ["--child", "model"] + (["--bf16-head"] if head == "bf16" else []),
              2, head == "bf16" and crashes_on_amx(True, 5, fc, 2)) for head in ("fp32", "bf16")]
    print("| configuration | threads | expected here | result | s | last stderr line |\n|---|---:|---|---|---:|---|")
    surprises = 0
    for name, child, threads, crash in rows:
        expected = "crash" if amx and crash else "ok"
        status, seconds, last = run(child, threads, args)
        surprises += (status == "ok") != (expected == "ok")
        last = "" if status == "ok" else last
        print(f"| {name} | {threads} | {expected} | {status} | {seconds:.1f} | {last} |", flush=True)
    if not amx:
        print("\nNo AMX on this CPU: oneDNN never runs its AMX backward-weights kernel here; every row is expected ok.")
    print(f"{surprises} row(s) differ from the boundary's prediction." if surprises else "Every row as predicted.")


if __name__ == "__main__":
    main()
