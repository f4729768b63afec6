"""Shared fixtures of the reliability suite: a tiny untrained model saved as a training checkpoint, and params."""

from __future__ import annotations

import pytest
import torch

from pipeline.model import build_model
from pipeline.params import parse_params
from pipeline.checkpoint import save_checkpoint
from pipeline.train import TrainState


@pytest.fixture(scope="session")
def params():
    return parse_params({"model": {"width": 0.0625}, "train": {"device": "cpu"}, "data": {"lock_timeout_s": 5},
                         "infer": {"chunk_wafers": 8, "batch_wafers": 8, "min_pattern_dies": 3}})


@pytest.fixture(scope="session")
def checkpoint(params, tmp_path_factory) -> str:
    torch.manual_seed(0)
    model = build_model(params.model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    path = tmp_path_factory.mktemp("model") / "model.pt"
    save_checkpoint(path, model, optimizer, scheduler, TrainState(), params)
    return str(path)
