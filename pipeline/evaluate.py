"""Segmentation metrics over on-wafer dies, per-wafer pattern counts, and evaluation plots.

One confusion matrix (rows = truth, columns = prediction) is accumulated over every on-wafer die of a
split, in the style of torchvision's references/segmentation; all metrics derive from it. Off-wafer
positions never count, whatever the model predicts there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from pipeline import real_eval, viz  # noqa: E402
from pipeline.patterns import wafer_patterns  # noqa: E402
from pipeline.predict import predict_wafers  # noqa: E402
from pipeline.wafer import CLASS_NAMES, DEFECT_CLASSES, NUM_CLASSES, OFF_WAFER, Wafer, class_die_counts  # noqa: E402,F401

ArrayLike = np.ndarray | torch.Tensor


class ConfusionMatrix:
    """Die counts by (true class, predicted class), accumulated over the dies where `valid` is true."""

    def __init__(self, num_classes: int = NUM_CLASSES):
        self.num_classes = num_classes
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)

    def update(self, target: ArrayLike, prediction: ArrayLike, valid: ArrayLike) -> None:
        """Add dies of any shape (one wafer or a batch); counted on the prediction's device."""
        if tuple(target.shape) != tuple(prediction.shape) or tuple(target.shape) != tuple(valid.shape):
            raise ValueError(f"shapes differ: target {tuple(target.shape)}, prediction {tuple(prediction.shape)}, "
                             f"valid {tuple(valid.shape)}")
        n = self.num_classes
        guess = torch.as_tensor(prediction)
        keep = torch.as_tensor(valid, device=guess.device).bool()
        truth = torch.as_tensor(target, device=guess.device)[keep].long()
        guess = guess[keep].long()
        if ((truth < 0) | (truth >= n) | (guess < 0) | (guess >= n)).any():
            self._raise_out_of_range(truth.cpu().numpy(), guess.cpu().numpy())
        self.matrix += torch.bincount(truth * n + guess, minlength=n * n).cpu().numpy().reshape(n, n)

    def _raise_out_of_range(self, truth: np.ndarray, guess: np.ndarray) -> None:
        # Checked because an out-of-range id would silently land in another cell of the flat bincount.
        ids = np.concatenate([truth, guess])
        bad = np.unique(ids[(ids < 0) | (ids >= self.num_classes)])[:5].tolist()
        raise ValueError(f"class ids {bad} outside 0..{self.num_classes - 1} on valid dies")

    def reset(self) -> None:
        self.matrix[:] = 0

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """Add another matrix's counts (e.g. from another worker) into this one; returns self."""
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge {other.num_classes}-class counts into {self.num_classes} classes")
        self.matrix += other.matrix
        return self


def _nanmean(values: np.ndarray) -> float:
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else float("nan")


def compute_metrics(matrix: np.ndarray) -> dict:
    """Pixel accuracy, per-class IoU, mIoU (5 classes) and defect mIoU (classes 1-4) from a confusion matrix.

    A class that appears neither in truth nor in prediction has IoU NaN and is left out of the means
    (there is nothing to get right or wrong); a class only predicted, or only true, has IoU 0. A mean over
    classes that are all absent is NaN, as is pixel accuracy of an empty matrix. `iou_<class name>` repeats
    each IoU as a flat float for MLflow.
    """
    matrix = np.asarray(matrix, dtype=np.int64)
    true_positive = np.diag(matrix).astype(np.float64)
    union = matrix.sum(axis=0) + matrix.sum(axis=1) - true_positive
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, true_positive / union, np.nan)
    total = matrix.sum()
    metrics: dict = {
        "pixel_accuracy": float(true_positive.sum() / total) if total else float("nan"),
        "iou": [float(value) for value in iou],
        "miou": _nanmean(iou),
        "defect_miou": _nanmean(iou[list(DEFECT_CLASSES)]),
    }
    metrics.update({f"iou_{name}": float(value) for name, value in zip(CLASS_NAMES, iou)})
    return metrics


def headline_metrics(metrics: dict) -> dict:
    """The numbers DVC and people compare: mIoU, defect mIoU, pixel accuracy and IoU per class name
    (NaN, a class absent everywhere, becomes null: JSON has no NaN)."""

    def number(value: float) -> float | None:
        return None if math.isnan(value) else round(value, 6)

    return {"miou": number(metrics["miou"]), "defect_miou": number(metrics["defect_miou"]),
            "pixel_accuracy": number(metrics["pixel_accuracy"]),
            "iou": {name: number(value) for name, value in zip(CLASS_NAMES, metrics["iou"])}}


def plot_confusion(matrix: np.ndarray, path: Path, title: str = "Confusion matrix (on-wafer dies)") -> Path:
    """Row-normalised heat map (share of each true class) with the die counts written in each cell."""
    matrix = np.asarray(matrix, dtype=np.int64)
    row_totals = matrix.sum(axis=1, keepdims=True)
    shares = np.divide(matrix, row_totals, out=np.zeros(matrix.shape), where=row_totals > 0)
    names = CLASS_NAMES[: len(matrix)]
    fig, axis = plt.subplots(figsize=(6.2, 5.4))
    image = axis.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for row in range(len(matrix)):
        for col in range(len(matrix)):
            colour = "white" if shares[row, col] > 0.5 else "black"
            axis.text(col, row, f"{matrix[row, col]:,}\n{shares[row, col]:.0%}", ha="center", va="center",
                      fontsize=8, color=colour)
    axis.set_xticks(range(len(names)), names, rotation=30, ha="right")
    axis.set_yticks(range(len(names)), names)
    axis.set_xlabel("predicted")
    axis.set_ylabel("truth")
    axis.set_title(title, fontsize=10)
    fig.colorbar(image, ax=axis, fraction=0.046, label="share of true class")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _pattern_caption(prefix: str, mask: np.ndarray, wafer_map: np.ndarray) -> str:
    counts = class_die_counts(mask, wafer_map)
    present = [CLASS_NAMES[c] for c in DEFECT_CLASSES if counts[c]]
    return f"{prefix}: {', '.join(present) or 'no pattern'}"


def plot_overlays(wafers: Sequence[Wafer], predictions: Sequence[np.ndarray], path: Path, n: int = 8) -> Path:
    """The first n wafers, one row each: input map | truth mask | prediction, patterns listed in captions."""
    panels = []
    for wafer, prediction in list(zip(wafers, predictions))[:n]:
        prediction = np.asarray(prediction)
        row = [(f"{wafer.lot_id}/{wafer.wafer_id}", viz.colour_dies(wafer.map))]
        if wafer.mask is None:  # keep the columns aligned: the bare map stands in for the missing truth
            row.append(("truth: unlabelled", viz.colour_dies(wafer.map)))
        else:
            row.append((_pattern_caption("truth", wafer.mask, wafer.map), viz.colour_dies(wafer.map, wafer.mask)))
        row.append((_pattern_caption("pred", prediction, wafer.map), viz.colour_dies(wafer.map, prediction)))
        panels.append(row)
    if not panels:
        raise ValueError("plot_overlays needs at least one wafer")
    return viz.save_wafer_grid(panels, Path(path), title="map | truth | prediction")


def evaluate_predictions(
    wafers: Sequence[Wafer], predictions: Sequence[np.ndarray]
) -> tuple[ConfusionMatrix, dict]:
    """Confusion matrix and metrics of predicted masks against labelled wafers, over on-wafer dies."""
    if len(wafers) != len(predictions):
        raise ValueError(f"{len(wafers)} wafers but {len(predictions)} predictions")
    confusion = ConfusionMatrix()
    for wafer, prediction in zip(wafers, predictions):
        if wafer.mask is None:
            raise ValueError(f"wafer {wafer.lot_id}/{wafer.wafer_id} ({wafer.source}) has no mask to evaluate against")
        prediction = np.asarray(prediction)
        if prediction.shape != wafer.shape:
            raise ValueError(f"wafer {wafer.lot_id}/{wafer.wafer_id}: prediction shape {prediction.shape} "
                             f"differs from map shape {wafer.shape}")
        confusion.update(wafer.mask, prediction, wafer.map != OFF_WAFER)
    return confusion, compute_metrics(confusion.matrix)


def evaluate_model(model, wafers: Sequence[Wafer], batch_wafers: int, device: torch.device, amp: bool = False,
                   channels_last: bool = False) -> tuple[ConfusionMatrix, dict]:
    return evaluate_predictions(wafers, predict_wafers(model, wafers, batch_wafers, device, amp, channels_last))


def real_outcomes(model, wafers: Sequence[Wafer], params, device: torch.device, amp: bool = False
                  ) -> tuple[list[str], list[str]]:
    """`patterns` and `dominant_class` of each wafer as the reports would give them."""
    tp = params.train
    masks = predict_wafers(model, wafers, params.infer.batch_wafers, device, amp, tp.channels_last)
    decided = [wafer_patterns(mask, wafer.map, params.infer.min_pattern_dies) for wafer, mask in zip(wafers, masks)]
    return [p for p, _ in decided], [d for _, d in decided]


def evaluate_real(model, real: dict[str, Sequence[Wafer]], params, device: torch.device, amp: bool = False
                  ) -> dict[str, dict]:
    """Wafer-level scores of a model on real labelled wafers, per real set (real_eval.score_set)."""
    scores = {}
    for name, wafers in real.items():
        patterns, dominant = real_outcomes(model, wafers, params, device, amp)
        scores[name] = real_eval.score_set(name, [w.label for w in wafers], patterns, dominant)
    return scores


def evaluate_split(model, wafers: Sequence[Wafer], out_dir: Path, name: str, batch_wafers: int,
                   device: torch.device, amp: bool = False, channels_last: bool = False,
                   title: str | None = None) -> tuple[ConfusionMatrix, dict, list[Path]]:
    """Predict labelled wafers, score them, and draw `confusion_<name>.png` and `overlays_<name>.png`."""
    predictions = predict_wafers(model, wafers, batch_wafers, device, amp, channels_last)
    confusion, metrics = evaluate_predictions(wafers, predictions)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = [plot_confusion(confusion.matrix, out_dir / f"confusion_{name}.png", title=title or name),
             plot_overlays(wafers, predictions, out_dir / f"overlays_{name}.png")]
    return confusion, metrics, plots
