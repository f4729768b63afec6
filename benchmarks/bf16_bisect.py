"""Run bf16_repro.py configurations each in its own subprocess (MALLOC_CHECK_=3, timeout) and tabulate.

    .venv/bin/python benchmarks/bf16_bisect.py [--timeout 300] [--only SUBSTRING]
A crash shows as a negative rc (the signal) or glibc's message in the tail. On an AMX host every width-1
configuration below crashes only with `--bf16-head` (the score head in bf16, as it was before the fix):
the default model keeps its head in fp32.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger("bf16_bisect")
REPRO = Path(__file__).with_name("bf16_repro.py")

CONFIGS: list[str] = [
    "--width 1 --batch 8 --size 64 --autocast --channels-last --full-fc6",
    "--width 1 --batch 8 --size 64 --autocast --full-fc6",
    "--width 1 --batch 8 --size 64 --channels-last --full-fc6",
    "--width 1 --batch 4 --size 64 --autocast --channels-last --full-fc6",
    "--width 1 --batch 16 --size 64 --autocast --channels-last --steps 2 --full-fc6",
    "--width 1 --batch 8 --size 32 --autocast --channels-last --full-fc6",
    "--width 1 --batch 4 --size 96 --autocast --channels-last --steps 2 --full-fc6",
    "--width 1 --batch 2 --size 224 --autocast --channels-last --steps 2 --full-fc6",
    "--width 0.25 --batch 8 --size 64 --autocast --channels-last --full-fc6",
    "--width 1 --batch 8 --size 64 --autocast --channels-last --bf16-head",
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--only", default="", help="run only configurations containing this substring")
    parser.add_argument("--config", action="append", help="a bf16_repro.py argument string (repeatable)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    env = {**os.environ, "MALLOC_CHECK_": "3", "PYTHONPATH": ".", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    for config in args.config or [c for c in CONFIGS if args.only in c]:
        start = time.perf_counter()
        try:
            proc = subprocess.run(
                [sys.executable, str(REPRO), *config.split()], env=env, capture_output=True, text=True, timeout=args.timeout
            )
            status = f"rc={proc.returncode}"
            tail = " | ".join((proc.stdout + proc.stderr).strip().splitlines()[-2:])
        except subprocess.TimeoutExpired:
            status, tail = "timeout", ""
        log.info("%-70s %-8s %6.1fs  %s", config, status, time.perf_counter() - start, tail[:200])


if __name__ == "__main__":
    main()
