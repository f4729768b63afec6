"""Training FCN-8s on a labelled dataset: bucketed batches, joint map+mask augmentation, class-weighted
cross-entropy over on-wafer dies, per-epoch checkpoints that resume bit-for-bit, early stopping on val mIoU.

The loop reports each epoch through a callback; `pipeline.registry` turns those into an MLflow run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torchvision import tv_tensors
from torchvision.transforms import v2

from pipeline import distributed
from pipeline.dataset import WaferDataset
from pipeline.evaluate import evaluate_model, evaluate_split, headline_metrics
from pipeline.model import autocast_context, build_model, load_checkpoint_file
from pipeline.params import Params, TrainParams
from pipeline.predict import IGNORE_INDEX, bucket_batches, model_input, training_batch
from pipeline.wafer import DIE_COLUMNS

log = logging.getLogger(__name__)

CHECKPOINT = "last.pt"
EpochCallback = Callable[[int, dict[str, float]], None]


def select_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is available")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def use_amp(params: TrainParams, device: torch.device) -> bool:
    """'auto' means bf16 autocast on CUDA only; see model.autocast_context for why CPU training stays fp32."""
    return params.amp == "bf16" or (params.amp == "auto" and device.type == "cuda")


def class_weights(dataset: WaferDataset, params: TrainParams) -> torch.Tensor:
    """(1 / frequency) ** power of each class over the train split's on-wafer dies, normalised, capped."""
    train = dataset.index[dataset.index["split"] == "train"]
    counts = train[DIE_COLUMNS].sum().to_numpy(dtype=np.float64) + 1.0
    weights = (counts.sum() / counts) ** params.class_weight_power
    weights = np.minimum(weights / weights.min(), params.class_weight_cap)
    return torch.tensor(weights, dtype=torch.float32)


class RandomRot90(v2.Transform):
    """Rotate map and mask together by a random multiple of 90 degrees (any wafer allows this)."""

    def make_params(self, flat_inputs: list) -> dict:
        return {"k": int(torch.randint(4, ()).item())}

    def transform(self, inpt: torch.Tensor, params: dict) -> torch.Tensor:
        return torch.rot90(inpt, params["k"], dims=(-2, -1))


AUGMENT = v2.Compose([v2.RandomHorizontalFlip(), v2.RandomVerticalFlip(), RandomRot90()])


def augment_batch(maps: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One random flip/rot90 for the whole padded batch, applied jointly to maps (as an image) and masks."""
    image, mask = AUGMENT(tv_tensors.Image(maps.unsqueeze(1)), tv_tensors.Mask(targets))
    return image.squeeze(1).as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor)


def poly_lr(step: int, total_steps: int, power: float) -> float:
    return (1.0 - min(step, total_steps) / total_steps) ** power


def make_optimizer(model: torch.nn.Module, params: TrainParams, fused: bool = True) -> torch.optim.Optimizer:
    """AdamW fused into one kernel per step by default: 1.2-1.45x faster fp32 training steps on CPU than the
    per-tensor loops, the same updates to rounding (benchmarks/results/speed-cpu.md)."""
    if params.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=params.lr, momentum=params.momentum,
                               weight_decay=params.weight_decay)
    return torch.optim.AdamW(model.parameters(), lr=params.lr, weight_decay=params.weight_decay, fused=fused)


@dataclass
class TrainState:
    """Everything a resumed run needs to continue exactly where the last checkpoint left it."""

    epoch: int = 0
    best_miou: float = -1.0
    best_epoch: int = 0
    epochs_since_best: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    best_weights: dict | None = None
    run_id: str | None = None
    train_seconds: float = 0.0
    wafers_seen: int = 0


@dataclass
class TrainResult:
    model: torch.nn.Module
    state: TrainState
    device: torch.device
    amp: bool
    stopped_early: bool


def _save_atomically(payload: dict, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_suffix(".tmp")
    torch.save(payload, staging)
    os.replace(staging, path)  # a crash mid-save keeps the previous file
    return path


def save_checkpoint(path: Path, model, optimizer, scheduler, state: TrainState, params: Params) -> None:
    _save_atomically({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                      "scheduler": scheduler.state_dict(), "state": state.__dict__,
                      "params": params.model_dump(mode="json")}, path)


def load_checkpoint(path: Path, model, optimizer, scheduler) -> TrainState:
    checkpoint = load_checkpoint_file(path, path)
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    return TrainState(**checkpoint["state"])


def _progress() -> Progress:
    return Progress(TextColumn("epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]:.4f}  val mIoU {task.fields[miou]:.4f}"),
                    TimeElapsedColumn(), transient=False)


def fit(
    params: Params,
    dataset: WaferDataset,
    resume: bool = False,
    on_epoch: EpochCallback | None = None,
    on_start: Callable[[TrainState], None] | None = None,
    model: torch.nn.Module | None = None,
) -> TrainResult:
    """Train params.model (or `model`, built by the caller) on the dataset's train split, selecting the
    epoch with the best val mIoU."""
    tp = params.train
    group, device = distributed.join(select_device(tp.device))
    amp = use_amp(tp, device)
    torch.manual_seed(params.seed)
    model = (model if model is not None else build_model(params.model)).to(device)
    if tp.channels_last:
        model = model.to(memory_format=torch.channels_last)
    train_wafers = list(dataset.wafers("train"))
    val_wafers = list(dataset.wafers("val"))
    if not train_wafers or not val_wafers:
        raise ValueError(f"{dataset.root}: training needs wafers in both train and val splits")
    shapes = [w.shape for w in train_wafers]
    steps_per_epoch = len(distributed.my_batches(bucket_batches(shapes, tp.batch_wafers), group))
    total_steps = steps_per_epoch * tp.epochs
    optimizer = make_optimizer(model, tp)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: poly_lr(step, total_steps, tp.poly_power))
    weights = class_weights(dataset, tp).to(device)
    checkpoint = tp.checkpoint_dir / CHECKPOINT
    state = TrainState()
    if resume and checkpoint.is_file():
        state = load_checkpoint(checkpoint, model, optimizer, scheduler)
        log.info("resumed from %s after epoch %d", checkpoint, state.epoch)
    elif resume:
        log.warning("--resume: no checkpoint at %s, starting from scratch", checkpoint)
    network = distributed.wrap(model, group, device)  # the module that trains; `model` holds its weights
    if on_start and group.is_main:
        on_start(state)
    log.info("training %s width %.3g on %s (amp=%s): %d train / %d val wafers, %d steps per epoch",
             params.model.arch, params.model.width, device, amp, len(train_wafers), len(val_wafers),
             steps_per_epoch)

    stopped_early = False
    with _progress() as progress:
        task = progress.add_task("train", total=steps_per_epoch, epoch=state.epoch + 1, loss=math.nan,
                                 miou=math.nan)
        while state.epoch < tp.epochs:
            if state.epochs_since_best >= tp.early_stop_patience:
                stopped_early = True
                break
            epoch = state.epoch + 1
            # Every random draw of an epoch derives from (seed, epoch): resuming replays it exactly.
            torch.manual_seed(params.seed * 100_003 + epoch)
            rng = np.random.default_rng([params.seed, epoch])
            progress.reset(task, total=steps_per_epoch, epoch=epoch, loss=math.nan,
                           miou=state.history[-1]["val_miou"] if state.history else math.nan)
            network.train()
            started, loss_sum, seen = time.perf_counter(), 0.0, 0
            for batch in distributed.my_batches(bucket_batches(shapes, tp.batch_wafers, rng), group):
                maps, targets = training_batch([train_wafers[i] for i in batch])
                if tp.augment:
                    maps, targets = augment_batch(maps, targets)
                targets = targets.to(device, non_blocking=True)
                with autocast_context(device, training=True, enabled=amp):
                    logits = network(model_input(maps, device, tp.channels_last))
                loss = F.cross_entropy(logits.float(), targets, weight=weights, ignore_index=IGNORE_INDEX)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                loss_sum += loss.item() * len(batch)
                seen += len(batch)
                progress.update(task, advance=1, loss=loss_sum / seen)
            state.train_seconds += time.perf_counter() - started
            state.wafers_seen += seen
            _, metrics = evaluate_model(model, val_wafers, tp.batch_wafers, device, amp, tp.channels_last)
            record = {"train_loss": loss_sum / seen, "lr": scheduler.get_last_lr()[0],
                      "train_wafers_per_s": seen / (time.perf_counter() - started),
                      **{f"val_{k}": v for k, v in metrics.items() if isinstance(v, float)}}
            state.epoch = epoch
            state.history.append(record)
            if record["val_miou"] > state.best_miou:
                state.best_miou, state.best_epoch, state.epochs_since_best = record["val_miou"], epoch, 0
                state.best_weights = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            else:
                state.epochs_since_best += 1
            progress.update(task, miou=record["val_miou"])
            if group.is_main:
                save_checkpoint(checkpoint, model, optimizer, scheduler, state, params)
            if on_epoch and group.is_main:
                on_epoch(epoch, record)
            log.info("epoch %d: loss %.4f, val mIoU %.4f (best %.4f @ %d)", epoch, record["train_loss"],
                     record["val_miou"], state.best_miou, state.best_epoch)
    if state.best_weights is not None:
        model.load_state_dict(state.best_weights)
    return TrainResult(model, state, device, amp, stopped_early)


def save_model(path: Path, model: torch.nn.Module, params: Params) -> Path:
    """The selected weights alone, in the checkpoint layout `registry.load_model` reads (no optimizer)."""
    return _save_atomically({"model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                             "state": {}, "params": params.model_dump(mode="json")}, path)


def write_history(history: list[dict[str, float]], path: Path) -> Path:
    """One row per epoch (x: epoch) for DVC plots and people."""
    import pandas as pd

    frame = pd.DataFrame(history)
    frame.insert(0, "epoch", range(1, len(frame) + 1))
    frame.to_csv(path, index=False, float_format="%.6g")
    return path


def _flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    flat: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def train_and_register(params: Params, dataset_dir: Path, resume: bool = False, out_dir: Path | None = None) -> dict:
    """The `train` stage: fit, evaluate on the test split, log it all to one MLflow run, register the model
    and let the gate decide whether it becomes champion. Returns the summary it also writes as JSON."""
    import mlflow

    from pipeline import registry
    from pipeline.versioning import dataset_version, dvc_md5

    dataset = WaferDataset(dataset_dir)
    if not distributed.from_env().is_main:  # other torchrun ranks train alongside rank 0, which alone records
        fit(params, dataset, resume=resume)
        return {}
    out_dir = Path(out_dir or params.train.reports_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    registry.configure(params.registry)
    # The DVC md5 of data/ names the labelled data; the content hash names the exact split trained on.
    version = dvc_md5(params.data) or "untracked"
    content_hash = dataset_version(dataset_dir)

    def start(state: TrainState) -> None:
        run = mlflow.start_run(run_id=state.run_id, log_system_metrics=params.registry.system_metrics)
        state.run_id = run.info.run_id
        if not resume or not state.history:
            mlflow.log_params(_flatten(params.model_dump(mode="json")))
            mlflow.log_params({"dataset.version": version, "dataset.content_hash": content_hash,
                               "dataset.path": str(dataset_dir),
                               **{f"dataset.{s}_wafers": int((dataset.index["split"] == s).sum())
                                  for s in ("train", "val", "test")}})
            mlflow.set_tags({"dataset_version": version, "profile": params.profile})

    try:
        result = fit(params, dataset, resume=resume, on_start=start,
                     on_epoch=lambda epoch, record: mlflow.log_metrics(record, step=epoch))
        test_wafers = list(dataset.wafers("test"))
        confusion, metrics, plots = evaluate_split(result.model, test_wafers, out_dir, "test",
                                                   params.train.batch_wafers, result.device, result.amp,
                                                   params.train.channels_last)
        test_metrics = {f"test_{k}": v for k, v in metrics.items() if isinstance(v, float)}
        save_model(params.train.model_out, result.model, params)
        write_history(result.state.history, out_dir / "history.csv")
        (out_dir / "metrics.json").write_text(json.dumps(
            {"test": headline_metrics(metrics), "best_epoch": result.state.best_epoch,
             "best_val_miou": round(result.state.best_miou, 6)}, indent=2))
        mlflow.log_metrics(test_metrics)
        mlflow.log_metrics({"best_epoch": result.state.best_epoch, "epochs_run": result.state.epoch,
                            "train_wafers_per_s_overall": result.state.wafers_seen / result.state.train_seconds})
        for plot in plots:
            mlflow.log_artifact(str(plot), "plots")
        mlflow.log_dict({"matrix": confusion.matrix.tolist(), "metrics": metrics}, "metrics/test_confusion.json")
        example = np.stack([test_wafers[0].map])
        registry.log_weights(params.train.model_out)
        info = registry.log_model(result.model, example, params.registry.model_name)
        model_version = str(info.registered_model_version)

        def champion_miou(uri: str) -> float:
            champion, _ = registry.load_model(uri, params.registry, result.device)
            return evaluate_model(champion, test_wafers, params.train.batch_wafers, result.device, result.amp,
                                  params.train.channels_last)[1]["miou"]

        decision = registry.gate(params.registry.model_name, model_version, metrics["miou"], champion_miou)
        mlflow.set_tag("gate", decision.describe())
        mlflow.log_metrics({"gate_promoted": float(decision.promoted),
                            **({"champion_test_miou": decision.champion_miou}
                               if decision.champion_miou is not None else {})})
        summary = {"run_id": result.state.run_id, "model_version": model_version, "dataset_version": version,
                   "promoted": decision.promoted, "gate": decision.describe(), "best_epoch": result.state.best_epoch,
                   "epochs_run": result.state.epoch, "stopped_early": result.stopped_early,
                   "train_seconds": round(result.state.train_seconds, 1),
                   "train_wafers_per_s": round(result.state.wafers_seen / result.state.train_seconds, 1),
                   **test_metrics}
        (out_dir / "train_summary.json").write_text(json.dumps(summary, indent=2, default=float))
        return summary
    finally:
        mlflow.end_run()
