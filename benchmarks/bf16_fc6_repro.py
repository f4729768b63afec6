"""Minimal repro candidate for the bf16 training crash: fc6 alone, forward + backward.

fc6 of full-width FCN-8s on a 64x64 wafer: a 7x7, padding-3 conv from 512 to 4096 channels on a
2x2 pool5 map. Run it in a subprocess and watch which oneDNN kernel each pass gets:
    ONEDNN_VERBOSE=1 MALLOC_CHECK_=3 OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bf16_fc6_repro.py --bf16
On AVX2 the fp32 backward-weights pass at width 1 lands on oneDNN's `ref:any` (width 0.25 gets
`x64:gemm:jit`); bf16 never reaches oneDNN there. On an AMX host bf16 does, and this runs clean:
fc6 is not the crash; score_fr's bf16 backward-weights is (bf16_training.md).
"""

from __future__ import annotations

import argparse
import logging
import time

import torch
import torch.nn.functional as F

log = logging.getLogger("bf16_fc6_repro")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--side", type=int, default=2, help="pool5 side: input side / 32")
    parser.add_argument("--bf16", action="store_true", help="under bf16 autocast")
    parser.add_argument("--contiguous", action="store_true", help="NCHW instead of channels_last")
    parser.add_argument("--trim", action="store_true", help="drop the taps that see only padding (what Fc6 does)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    torch.manual_seed(0)
    fmt = torch.contiguous_format if args.contiguous else torch.channels_last
    in_ch, out_ch = round(512 * args.width), round(4096 * args.width)
    x = torch.randn(args.batch, in_ch, args.side, args.side).to(memory_format=fmt).requires_grad_()
    weight = (torch.randn(out_ch, in_ch, 7, 7) * 0.01).to(memory_format=fmt).requires_grad_()
    bias = torch.zeros(out_ch, requires_grad=True)
    reach = min(args.side - 1, 3) if args.trim else 3
    for _ in range(args.repeats):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            y = F.conv2d(x, weight[:, :, 3 - reach : 4 + reach, 3 - reach : 4 + reach], bias, padding=reach)
        y.float().square().mean().backward()
        log.info("fwd+bwd %.2fs", time.perf_counter() - start)
    log.info("ok")


if __name__ == "__main__":
    main()
