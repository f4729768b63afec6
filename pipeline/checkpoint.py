"""The checkpoint format: written, read and turned back into a model here only.

A checkpoint is a torch file of tensors and plain values, read with torch's weights-only unpickler:
- a training checkpoint (`train.checkpoint_dir/last.pt`, rewritten every epoch): model, optimizer and scheduler
  states, the run's state (epoch, history, best weights...), the params and the resume key;
- a model file (`train.model_out`, and the `weights/` artifact of every registered run): the selected weights,
  an empty state and the params, whose `model` block says what network to build.
"""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path
from typing import BinaryIO

import torch

from pipeline.atomic import atomic_file
from pipeline.model import build_model
from pipeline.params import ModelParams, Params

LAST = "last.pt"  # the training checkpoint's name in train.checkpoint_dir
# Settings that do not change what a resumed run computes: where files go, which device runs it.
RESUME_INDEPENDENT_TRAIN_KEYS = ("device", "checkpoint_dir", "model_out", "reports_dir")
# What a checkpoint written before these model keys existed was built with.
LEGACY_MODEL_KEYS = {"batch_norm": False, "global_context": False}


def read(source: Path | BinaryIO, name: object) -> dict:
    """A checkpoint's tensors and plain values. Anything else in its pickle (a class, a function: code that
    would run on load) is refused unrun by torch's weights-only unpickler; `name` is the file in the message."""
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(f"{name}: refused: a checkpoint may hold only tensors and plain values ({error})") from None


def _write(payload: dict, path: Path) -> Path:
    """Flushed to disk under a staging name of its own, then renamed over `path` (two trainings may share a
    directory; a crash mid-save keeps the previous file). Readable by its owner only."""
    path = Path(path)
    with atomic_file(path, durable=True, mode=0o600) as staging, open(staging, "wb") as stream:
        torch.save(payload, stream)
    return path


def resume_key(params: Params, dataset_index: Path) -> dict:
    """What a checkpoint must have been trained with for --resume to continue it: the seed, the model, the
    training settings, the real sets and the training dataset's index file (its content)."""
    train = params.train.model_dump(mode="json", exclude=set(RESUME_INDEPENDENT_TRAIN_KEYS))
    index = hashlib.sha256(Path(dataset_index).read_bytes()).hexdigest()
    return {"seed": params.seed, "model": params.model.model_dump(mode="json"), "train": train,
            "real": params.real.model_dump(mode="json"), "dataset_index_sha256": index}


def save_checkpoint(path: Path, model, optimizer, scheduler, state, params: Params, key: dict | None = None) -> None:
    """A training checkpoint; `state` is the run's TrainState (its fields are stored as a dict)."""
    _write({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "state": dict(vars(state)), "params": params.model_dump(mode="json"), "resume_key": key}, path)


def with_current_offsets(weights: dict, model: torch.nn.Module) -> dict:
    """`weights` with the decision's offsets in the model's current layout. From before the calibrated
    decision: every offset 0, the uncalibrated rule. From before claim offsets (4 values): those offsets decide
    presence and claims alike, as they did then."""
    weights = dict(weights)
    offsets = weights.get("pattern_offsets", torch.zeros_like(model.pattern_offsets))
    weights["pattern_offsets"] = offsets.broadcast_to(model.pattern_offsets.shape).clone()
    return weights


def restore_training(path: Path, model, optimizer, scheduler, key: dict | None = None) -> dict:
    """Load a training checkpoint into model, optimizer and scheduler and return the run's state fields; with
    `key` (this run's resume_key), refuse one trained with other settings or data."""
    checkpoint = read(path, path)
    if key is not None and checkpoint.get("resume_key") != key:
        theirs = checkpoint.get("resume_key") or {}
        differ = sorted(k for k in key if theirs.get(k) != key[k]) or ["(no record)"]
        raise ValueError(f"{path}: cannot resume: the checkpoint was trained with other {', '.join(differ)}; "
                         "train without --resume to start over, or restore the settings and data it was made with")
    model.load_state_dict(with_current_offsets(checkpoint["model"], model))
    if checkpoint["state"].get("best_weights") is not None:
        checkpoint["state"]["best_weights"] = with_current_offsets(checkpoint["state"]["best_weights"], model)
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    return checkpoint["state"]


def save_model(path: Path, model: torch.nn.Module, params: Params) -> Path:
    """The selected weights alone (no optimizer): the file `load_model` and the registry read."""
    return _write({"model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                   "state": {}, "params": params.model_dump(mode="json")}, path)


def model_from(checkpoint: dict, device: torch.device) -> torch.nn.Module:
    """The network a checkpoint describes, with its best weights (a training checkpoint) or its weights, in
    eval mode. Checkpoints from before batch_norm, global_context and the calibrated decision still load."""
    model = build_model(ModelParams(**{**LEGACY_MODEL_KEYS, **checkpoint["params"]["model"]}))
    weights = dict(checkpoint["state"].get("best_weights") or checkpoint["model"])
    model.load_state_dict(with_current_offsets(weights, model))
    return model.to(device).eval()
