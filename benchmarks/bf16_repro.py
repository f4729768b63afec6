"""One configuration of FCN training steps on CPU, for bisecting the bf16-autocast crash.

Run it in a subprocess (a heap corruption aborts the interpreter), e.g.
    OMP_NUM_THREADS=2 MALLOC_CHECK_=3 .venv/bin/python benchmarks/bf16_repro.py --width 1 --batch 8 \
        --autocast --channels-last
Exit status 0 and a final "ok" line mean the steps ran; anything else is the crash.
"""

from __future__ import annotations

import argparse
import logging
import time

import torch
import torch.nn.functional as F

from pipeline.model import FCN, encode_maps

log = logging.getLogger("bf16_repro")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", default="fcn8s")
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--autocast", action="store_true")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--no-mkldnn", action="store_true", help="torch.backends.mkldnn.enabled = False")
    parser.add_argument("--fp32-modules", default="", help="comma-separated submodule names run outside autocast")
    parser.add_argument("--forward-only", action="store_true")
    parser.add_argument("--full-fc6", action="store_true", help="fc6 as the plain 7x7 conv, dead taps included (as it crashed)")
    parser.add_argument("--bf16-head", action="store_true", help="score/upsampling head in bf16 too (as it crashed)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    torch.manual_seed(0)
    torch.backends.mkldnn.enabled = not args.no_mkldnn
    model = FCN(args.arch, args.width).train()
    if args.full_fc6:
        use_full_7x7(model.fc[0])
    model.fp32_head = not args.bf16_head
    for name in filter(None, args.fp32_modules.split(",")):
        keep_fp32(model.get_submodule(name))
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    maps = torch.randint(0, 3, (args.batch, args.size, args.size))
    x = encode_maps(maps).to(memory_format=memory_format)
    target = torch.randint(0, 5, (args.batch, args.size, args.size))

    for step in range(args.steps):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.autocast):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), target)
        if not args.forward_only:
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        log.info("step %d loss %.4f %.2fs", step, loss.item(), time.perf_counter() - start)
    log.info("ok")


def use_full_7x7(fc6: torch.nn.Conv2d) -> None:
    """Undo Fc6's dead-tap trim: the 7x7 kernel over a mostly padded pool5 map."""
    fc6.forward = lambda x: F.conv2d(x, fc6.weight, fc6.bias, padding=3)


def keep_fp32(module: torch.nn.Module) -> None:
    """Run `module` in fp32 inside an autocast region."""
    forward = module.forward

    def fp32_forward(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", enabled=False):
            return forward(x.float())

    module.forward = fp32_forward


if __name__ == "__main__":
    main()
