"""What the fault and concurrency tests run: an inbox of small good lots, and Python children of the project."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from pipeline.io import write_npy_lots

from .catalogue import good_wafer

PROJECT = Path(__file__).parents[2]


def lot_id(number: int) -> str:
    return f"L{number:02d}"


def lots_inbox(root: Path, lots: int, per_lot: int) -> Path:
    """`root/inbox`: lots L00, L01, ... of `per_lot` good 24x24 wafers each, every wafer different."""
    inbox = root / "inbox"
    write_npy_lots([good_wafer(lot_id(lot), f"w{i}", seed=lot * 10 + i, size=24)
                    for lot in range(lots) for i in range(per_lot)], inbox)
    return inbox


def python_child(code: str, *args: str) -> subprocess.Popen:
    """`python -c code args...` in the project directory; its stderr is kept for the assertion messages."""
    return subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, cwd=PROJECT)
