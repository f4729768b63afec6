"""Where the model runs: the torch device params ask for, and whether training and evaluation autocast to bf16."""

from __future__ import annotations

import platform
from pathlib import Path

import torch

from pipeline.params import TrainParams


def select_device(name: str) -> torch.device:
    """`auto` is CUDA when there is a GPU, else the CPU; `cuda` without a GPU is an error, not a silent CPU run."""
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is available")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def use_amp(params: TrainParams, device: torch.device) -> bool:
    """'auto' means bf16 autocast on CUDA only; see model.autocast_context for why CPU training stays fp32."""
    return params.amp == "bf16" or (params.amp == "auto" and device.type == "cuda")


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), recorded beside every speed figure."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
