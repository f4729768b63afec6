"""Training FCN-8s on a labelled dataset: bucketed batches, joint map+mask augmentation, class-weighted
cross-entropy over on-wafer dies, per-epoch checkpoints that resume bit-for-bit, early stopping on val mIoU.

The loop reports each epoch through a callback; the train stage (`pipeline.stages.train`) logs them to MLflow.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torchvision import tv_tensors
from torchvision.transforms import v2

from pipeline import checkpoint, distributed, real_eval, realdata
from pipeline.dataset import INDEX_FILE as DATASET_INDEX
from pipeline.dataset import WaferDataset
from pipeline.device import select_device, use_amp
from pipeline.evaluate import compute_metrics, evaluate_model, evaluate_real
from pipeline.labels import label_classes
from pipeline.model import autocast_context, build_model, presence_logits
from pipeline.params import Params, TrainParams
from pipeline.patterns import CLAIM, PRESENCE, Evidence, MaskEvidence, calibrate_offsets
from pipeline.predict import IGNORE_INDEX, bucket_batches, evidence_of, model_input, stack_padded
from pipeline.wafer import CLASS_NAMES, DEFECT_CLASSES, DIE_COLUMNS, FAIL, NUM_CLASSES, OFF_WAFER, Wafer

log = logging.getLogger(__name__)

EpochCallback = Callable[[int, dict[str, float]], None]
RealWafersOf = dict[str, list[Wafer]]  # real set name -> wafers of one split


def class_weights(dataset: WaferDataset, params: TrainParams) -> torch.Tensor:
    """(1 / frequency) ** power of each class over the train split's on-wafer dies, normalised, capped."""
    train = dataset.index[(dataset.index["split"] == "train") & dataset.index["has_mask"]]
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


def training_batch(examples: Sequence[Example]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Padded maps (N, H, W) uint8, die targets (N, H, W) int64 (off-wafer dies and wafers without a mask
    ignored), presence targets (N, 4) float and allowed classes (N, 5) bool (all for masked wafers)."""
    maps = stack_padded([e.wafer.map for e in examples], OFF_WAFER)
    ignored = np.full(maps.shape[1:], IGNORE_INDEX, np.uint8)
    targets = stack_padded([e.mask if e.mask is not None else ignored[: e.wafer.shape[0], : e.wafer.shape[1]]
                            for e in examples], IGNORE_INDEX).astype(np.int64)
    targets[maps == OFF_WAFER] = IGNORE_INDEX
    present = np.stack([e.present for e in examples])
    allowed = np.stack([np.ones(NUM_CLASSES, bool) if e.allowed is None else e.allowed > 0 for e in examples])
    return torch.from_numpy(maps), torch.from_numpy(targets), torch.from_numpy(present), torch.from_numpy(allowed)


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
    best_score: float = -1.0
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
    calibration: dict[str, float] = field(default_factory=dict)


@dataclass
class Example:
    """One training wafer with what supervises it: a die mask (None: no die-level truth), the defect classes
    present on it (4 flags) and, for a wafer known only by its label, the classes its dies may take
    (5 flags: background and the labelled ones; None when the mask says it die by die)."""

    wafer: Wafer
    mask: np.ndarray | None
    present: np.ndarray
    allowed: np.ndarray | None = None


def synthetic_example(wafer: Wafer) -> Example:
    present = np.isin(DEFECT_CLASSES, wafer.mask[wafer.map == FAIL])
    return Example(wafer, wafer.mask, present.astype(np.float32))


def dataset_example(wafer: Wafer) -> Example:
    """A wafer of the training dataset: die-supervised when it has a mask (synthetic, or labelled die by die),
    else by its wafer-level label (real wafers ingested with a failure_type)."""
    return synthetic_example(wafer) if wafer.mask is not None else real_example(wafer)


def masked_wafers(dataset: WaferDataset, split: str) -> list[Wafer]:
    """The wafers of a split that have die masks: what mIoU is measured on."""
    return [w for w in dataset.wafers(split) if w.mask is not None]


def real_example(wafer: Wafer) -> Example:
    """A real wafer's label says which classes are present, and so which its dies may take: background or
    one of them (a none, Random or Near-full wafer: background only, an exact mask)."""
    classes = label_classes(wafer.label)
    present = np.isin(DEFECT_CLASSES, list(classes)).astype(np.float32)
    return Example(wafer, None, present, np.concatenate([[1.0], present]).astype(np.float32))


def _progress() -> Progress:
    return Progress(TextColumn("epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]:.4f}  val score {task.fields[score]:.4f}"),
                    TimeElapsedColumn(), transient=False)


def epoch_examples(params: Params, synthetic: list[Example], real: dict[str, dict[str, list[Example]]] | None,
                   rng: np.random.Generator) -> list[Example]:
    """One epoch's wafers: the training dataset's train split (or train.synthetic_per_epoch of it) and a
    stratified sample of each real set's train examples (realdata.epoch_sample)."""
    take = params.train.synthetic_per_epoch
    picked = list(synthetic) if take is None or take >= len(synthetic) else \
        [synthetic[i] for i in rng.choice(len(synthetic), take, replace=False)]
    for name, splits in (real or {}).items():
        examples = splits["train"]
        picked += [examples[i] for i in realdata.epoch_sample([e.wafer for e in examples], params.real.sets[name], rng)]
    return picked


def training_loss(logits: torch.Tensor, maps: torch.Tensor, targets: torch.Tensor, present: torch.Tensor,
                  allowed: torch.Tensor, weights: torch.Tensor, params: Params) -> torch.Tensor:
    """Class-weighted cross-entropy over the dies that have a mask; for wafers known by their label, the
    partial-label loss -log P(background or a labelled class) over their on-wafer dies (partial_weight), so
    every die learns which classes the wafer cannot carry; and presence_weight times the binary cross-entropy
    of each wafer's pooled presence (model.presence_logits) against the classes it carries."""
    logits = logits.float()
    loss = logits.new_zeros(())
    if (targets != IGNORE_INDEX).any():
        loss = F.cross_entropy(logits, targets, weight=weights, ignore_index=IGNORE_INDEX)
    partial = (~allowed.all(dim=1))[:, None, None] & (maps != OFF_WAFER)
    if params.train.partial_weight > 0 and partial.any():
        log_p = F.log_softmax(logits, dim=1).masked_fill(~allowed[:, :, None, None], float("-inf"))
        loss = loss - params.train.partial_weight * torch.logsumexp(log_p, dim=1)[partial].mean()
    if params.train.presence_weight > 0:
        pooled = presence_logits(logits, maps == FAIL, params.model.presence_sharpness)
        loss = loss + params.train.presence_weight * F.binary_cross_entropy_with_logits(pooled, present)
    return loss


def fit(
    params: Params,
    dataset: WaferDataset,
    resume: bool = False,
    on_epoch: EpochCallback | None = None,
    on_start: Callable[[TrainState], None] | None = None,
    model: torch.nn.Module | None = None,
    real: realdata.RealWafers | None = None,
) -> TrainResult:
    """Train params.model (or `model`, warm-started by the caller) on the dataset's train split and the real
    train splits in `real`, selecting the epoch with the best val score (selection_score); then calibrate the
    wafer-level decision on the whole real val (patterns.calibrate_offsets). A warm start's own weights are
    scored first as epoch 0: training keeps them unless an epoch beats them on val."""
    warm = model is not None
    tp = params.train
    group, device = distributed.join(select_device(tp.device))
    amp = use_amp(tp, device)
    torch.manual_seed(params.seed)
    model = (model if model is not None else build_model(params.model)).to(device)
    if tp.channels_last:
        model = model.to(memory_format=torch.channels_last)
    synthetic = [dataset_example(w) for w in dataset.wafers("train")]
    val_wafers = masked_wafers(dataset, "val")
    if not synthetic or not val_wafers:
        raise ValueError(f"{dataset.root}: training needs wafers in both train and val splits")
    real_examples = {name: {"train": [real_example(w) for w in splits["train"]]} for name, splits in (real or {}).items()}
    real_val = {name: _val_subset(splits["val"], params.real.sets[name].val_wafers, params.seed)
                for name, splits in (real or {}).items()}
    # The schedule needs the number of steps up front: an epoch's size is fixed, only its draw changes.
    first = epoch_examples(params, synthetic, real_examples, np.random.default_rng([params.seed, 0]))
    steps_per_epoch = len(distributed.my_batches(bucket_batches([e.wafer.shape for e in first], tp.batch_wafers),
                                                 group))
    total_steps = steps_per_epoch * tp.epochs
    optimizer = make_optimizer(model, tp)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: poly_lr(step, total_steps, tp.poly_power))
    weights = class_weights(dataset, tp).to(device)
    last = tp.checkpoint_dir / checkpoint.LAST
    key = checkpoint.resume_key(params, dataset.root / DATASET_INDEX)  # the same for every checkpoint of this run
    state = TrainState()
    if resume and last.is_file():
        state = TrainState(**checkpoint.restore_training(last, model, optimizer, scheduler, key))
        log.info("resumed from %s after epoch %d", last, state.epoch)
    elif resume:
        log.warning("--resume: no checkpoint at %s, starting from scratch", last)
    if warm and state.epoch == 0:
        start = validation_record(model, val_wafers, real_val, params, device, amp)["val_score"]
        state.best_score, state.best_weights = start, _weights_of(model)
        log.info("epoch 0 (the warm start's weights): val score %.4f", start)
    network = distributed.wrap(model, group, device)  # the module that trains; `model` holds its weights
    if on_start and group.is_main:
        on_start(state)
    log.info("training %s width %.3g on %s (amp=%s): %d wafers per epoch (%d synthetic train, real: %s), "
             "%d synthetic val, %d steps per epoch", params.model.arch, params.model.width, device, amp, len(first),
             len(synthetic), {n: len(s["train"]) for n, s in real_examples.items()}, len(val_wafers), steps_per_epoch)

    stopped_early = False
    with _progress() as progress:
        task = progress.add_task("train", total=steps_per_epoch, epoch=state.epoch + 1, loss=math.nan,
                                 score=math.nan)
        while state.epoch < tp.epochs:
            if state.epochs_since_best >= tp.early_stop_patience:
                stopped_early = True
                break
            epoch = state.epoch + 1
            # Every random draw of an epoch derives from (seed, epoch): resuming replays it exactly.
            torch.manual_seed(params.seed * 100_003 + epoch)
            rng = np.random.default_rng([params.seed, epoch])
            examples = epoch_examples(params, synthetic, real_examples, rng)
            progress.reset(task, total=steps_per_epoch, epoch=epoch, loss=math.nan,
                           score=state.history[-1]["val_score"] if state.history else math.nan)
            network.train()
            started, loss_sum, seen = time.perf_counter(), 0.0, 0
            batches = bucket_batches([e.wafer.shape for e in examples], tp.batch_wafers, rng)
            for batch in distributed.my_batches(batches, group)[:steps_per_epoch]:
                maps, targets, present, allowed = training_batch([examples[i] for i in batch])
                if tp.augment:
                    maps, targets = augment_batch(maps, targets)
                targets, present, allowed = targets.to(device, non_blocking=True), present.to(device), allowed.to(device)
                with autocast_context(device, training=True, enabled=amp):
                    logits = network(model_input(maps, device, tp.channels_last))
                loss = training_loss(logits, maps.to(device), targets, present, allowed, weights, params)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                loss_sum += loss.item() * len(batch)
                seen += len(batch)
                progress.update(task, advance=1, loss=loss_sum / seen)
            state.train_seconds += time.perf_counter() - started
            state.wafers_seen += seen
            distributed.sync_buffers(model, group)
            record = {"train_loss": loss_sum / seen, "lr": scheduler.get_last_lr()[0],
                      "train_wafers_per_s": seen / (time.perf_counter() - started),
                      **validation_record(model, val_wafers, real_val, params, device, amp)}
            state.epoch = epoch
            state.history.append(record)
            if record["val_score"] > state.best_score:
                state.best_score, state.best_epoch, state.epochs_since_best = record["val_score"], epoch, 0
                state.best_weights = _weights_of(model)
            else:
                state.epochs_since_best += 1
            progress.update(task, score=record["val_score"])
            if group.is_main:
                checkpoint.save_checkpoint(last, model, optimizer, scheduler, state, params, key)
            if on_epoch and group.is_main:
                on_epoch(epoch, record)
            log.info("epoch %d: loss %.4f, val score %.4f (best %.4f @ %d)", epoch, record["train_loss"],
                     record["val_score"], state.best_score, state.best_epoch)
    if state.best_weights is not None:
        model.load_state_dict(state.best_weights)
    calibration = {}
    if real:
        calibration = calibrate(model, {name: splits["val"] for name, splits in real.items()}, params, device, amp,
                                val_wafers)
    return TrainResult(model, state, device, amp, stopped_early, calibration)


def _weights_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _val_subset(wafers: list[Wafer], size: int | None, seed: int) -> list[Wafer]:
    if size is None or size >= len(wafers):
        return wafers
    return [wafers[i] for i in sorted(np.random.default_rng(seed).choice(len(wafers), size, replace=False))]


def validation_record(model, val_wafers: list[Wafer], real_val: RealWafersOf, params: Params, device: torch.device,
                      amp: bool) -> dict[str, float]:
    """Per-epoch val metrics and `val_score`, what selects the epoch: the mean of synthetic mIoU and each
    real set's headline score (WM-811K balanced accuracy, MixedWM38 exact match)."""
    tp = params.train
    _, metrics = evaluate_model(model, val_wafers, params.infer.batch_wafers, device, amp, tp.channels_last)
    record = {f"val_{k}": v for k, v in metrics.items() if isinstance(v, float)}
    real_scores = evaluate_real(model, real_val, params, device, amp)
    for name, scores in real_scores.items():
        record.update(real_eval.flat_metrics(scores, f"val_{name}"))
    record["val_score"] = selection_score(metrics["miou"], real_scores)
    return record


def selection_score(synthetic_miou: float, real_scores: dict[str, dict]) -> float:
    parts = [synthetic_miou, *(real_eval.main_score(scores) for scores in real_scores.values())]
    return float(np.mean(parts))


def calibrate(model, real_val: RealWafersOf, params: Params, device: torch.device, amp: bool,
              synthetic_val: Sequence[Wafer] = ()) -> dict[str, float]:
    """Fit the per-class presence and claim offsets of the wafer-level decision on the whole real val (and,
    with patterns.calibrate_masks, the masks of `synthetic_val`), set them on the model (they travel with its
    weights) and return them with the val objective before and after."""
    pp, tp = params.patterns, params.train
    names = list(real_val)

    def evidence(wafers: Sequence[Wafer]) -> Evidence:
        return evidence_of(model, wafers, params.infer.batch_wafers, device, amp, tp.channels_last)

    merged = Evidence.concatenate([evidence(real_val[name]) for name in names])
    masks = MaskEvidence.gather(evidence(synthetic_val), synthetic_val) if pp.calibrate_masks and synthetic_val else None
    labels = [w.label for name in names for w in real_val[name]]
    bounds = np.cumsum([0, *[len(real_val[name]) for name in names]])

    def objective(patterns: list[str], dominant: list[str], confusion: np.ndarray | None) -> float:
        scores = [real_eval.score_set(name, labels[a:b], patterns[a:b], dominant[a:b])
                  for name, a, b in zip(names, bounds[:-1], bounds[1:])]
        miou = compute_metrics(confusion)["miou"] if confusion is not None else None
        return real_eval.calibration_objective(scores, pp.max_false_alarms, pp.false_alarm_penalty, miou)

    def value_at(offsets: np.ndarray) -> float:
        return objective(*merged.decide(offsets, params.infer.min_pattern_dies),
                         masks.confusion(offsets) if masks is not None else None)

    before = value_at(np.zeros(len(DEFECT_CLASSES)))
    if pp.offsets is not None:
        offsets = np.asarray([pp.offsets, pp.claim_offsets or pp.offsets], dtype=np.float64)
        after = value_at(offsets)
        log.info("patterns.offsets in params, not calibrated: %s (val objective %.4f)", offsets.tolist(), after)
    else:
        lo, hi, steps = pp.offset_grid
        offsets, after = calibrate_offsets(merged, objective, params.infer.min_pattern_dies,
                                           np.linspace(lo, hi, int(steps)), pp.calibration_rounds, pp.calibrate_claims,
                                           masks)
    model.pattern_offsets.copy_(torch.as_tensor(offsets, dtype=torch.float32))
    return {"val_objective_uncalibrated": before, "val_objective_calibrated": after,
            **{f"offset_{CLASS_NAMES[c]}": float(o) for c, o in zip(DEFECT_CLASSES, offsets[PRESENCE])},
            **{f"claim_offset_{CLASS_NAMES[c]}": float(o) for c, o in zip(DEFECT_CLASSES, offsets[CLAIM])}}


def write_history(history: list[dict[str, float]], path: Path) -> Path:
    """One row per epoch (x: epoch) for DVC plots and people."""
    import pandas as pd

    frame = pd.DataFrame(history)
    frame.insert(0, "epoch", range(1, len(frame) + 1))
    frame.to_csv(path, index=False, float_format="%.6g")
    return path
