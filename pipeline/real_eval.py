"""Wafer-level scores on real labelled data (WM-811K, MixedWM38), their headline numbers, tables and plots.

Real data labels whole wafers, not dies, so a real wafer is scored on what the report says about it: its
`dominant_class` against the class the contract's table expects for its WM-811K label, and its `patterns`
set against the classes its MixedWM38 label maps to. Everything here takes plain strings (no model, no
torch), so the scores can be recomputed from any `wafers.csv` and a label column.

Every returned value is JSON-able and NaN-free: a label or class absent from the data is left out of the
per-label dicts (there is nothing to get right or wrong), and a rate with no wafers to count is None.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from pipeline import labels as wl  # noqa: E402
from pipeline.wafer import CLASS_NAMES, DEFECT_CLASSES  # noqa: E402

# Columns of the WM-811K confusion: the values `dominant_class` can take, 'none' first.
OUTCOMES: tuple[str, ...] = (wl.NONE, *(CLASS_NAMES[c] for c in DEFECT_CLASSES))
DEFECT_NAMES: tuple[str, ...] = OUTCOMES[1:]
MOST_CONFUSED = 10
DIGITS = 4


def _check_lengths(labels: Sequence[str], predicted: Sequence[str], what: str) -> None:
    if len(labels) != len(predicted):
        raise ValueError(f"{len(labels)} labels but {len(predicted)} {what}")
    if not len(labels):
        raise ValueError("no wafers to score")


def _single_label(text: object, index: int) -> str:
    """The canonical WM-811K label; a multi-pattern label has no single expected dominant class."""
    try:
        parts = wl.parse_label(text)
    except ValueError as error:
        raise ValueError(f"wafer {index}: {error}") from error
    if len(parts) > 1:
        raise ValueError(f"wafer {index}: label {text!r} names several patterns; WM-811K labels are single "
                         f"(one of {', '.join(wl.WM811K_LABELS)})")
    return parts[0] if parts else wl.NONE


def _ratio(numerator: int, denominator: int) -> float | None:
    return numerator / denominator if denominator else None


def wm811k_scores(labels: Sequence[str], outcomes: Sequence[str]) -> dict:
    """Score predicted `dominant_class` per wafer against WM-811K failureTypes (the contract's table).

    Keys: kind ('wm811k'), wafers, labels (row order), outcomes (column order), confusion (9x5 ints),
    counts / recall (per label present), balanced_accuracy (mean recall over labels present, so a rare
    label weighs as much as a common one), accuracy, false_alarm_rate (share of none/Random/Near-full
    wafers given any pattern; None when there are none) and false_alarm_wafers.
    """
    _check_lengths(labels, outcomes, "outcomes")
    confusion = np.zeros((len(wl.WM811K_LABELS), len(OUTCOMES)), dtype=np.int64)
    for index, (text, outcome) in enumerate(zip(labels, outcomes)):
        label = _single_label(text, index)
        shown = outcome.strip() if isinstance(outcome, str) else outcome
        if shown not in OUTCOMES:
            raise ValueError(f"wafer {index}: outcome {outcome!r} is not a dominant_class "
                             f"(one of {', '.join(OUTCOMES)})")
        confusion[wl.WM811K_LABELS.index(label), OUTCOMES.index(shown)] += 1
    counts, recall, correct = {}, {}, 0
    for row, label in enumerate(wl.WM811K_LABELS):
        total = int(confusion[row].sum())
        if total:
            hits = int(confusion[row, OUTCOMES.index(wl.expected_dominant(label))])
            counts[label], recall[label] = total, hits / total
            correct += hits
    quiet_rows = [wl.WM811K_LABELS.index(label) for label in wl.WM811K_LABELS if label in wl.NO_PATTERN_LABELS]
    quiet = int(confusion[quiet_rows].sum())
    alarms = int(confusion[quiet_rows, 1:].sum())
    wafers = int(confusion.sum())
    return {"kind": "wm811k", "wafers": wafers, "labels": list(wl.WM811K_LABELS), "outcomes": list(OUTCOMES),
            "confusion": confusion.tolist(), "counts": counts, "recall": recall,
            "balanced_accuracy": float(np.mean(list(recall.values()))), "accuracy": correct / wafers,
            "false_alarm_rate": _ratio(alarms, quiet), "false_alarm_wafers": alarms}


def _predicted_classes(text: object, index: int) -> frozenset[int]:
    """Class ids of a report's `patterns` string ('ring+local_zone' or 'none')."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"wafer {index}: patterns {text!r} is empty; expected class names joined by '+' or 'none'")
    if text.strip() == wl.NONE:
        return frozenset()
    parts = [part.strip() for part in text.split("+")]
    unknown = [part for part in parts if part not in DEFECT_NAMES]
    if unknown:
        raise ValueError(f"wafer {index}: patterns {text!r}: unknown class(es) {unknown}; "
                         f"known: {', '.join(DEFECT_NAMES)} or 'none'")
    return frozenset(CLASS_NAMES.index(part) for part in parts)


def mixed_scores(labels: Sequence[str], predicted: Sequence[str]) -> dict:
    """Score predicted pattern sets against MixedWM38 labels (or single WM-811K labels: one-pattern sets).

    Keys: kind ('mixed'), wafers, exact_match (share of wafers whose predicted set equals the true set),
    support (wafers truly having each class), precision / recall / f1 (per-class presence, over classes
    present in truth or prediction; a zero denominator scores 0, as sklearn's zero_division=0),
    macro_f1 (mean F1 over those classes; None when no wafer has or is given any pattern) and
    most_confused (the 10 commonest wrong (truth, predicted) sets as {truth, predicted, wafers}).
    """
    _check_lengths(labels, predicted, "predicted pattern sets")
    pairs: list[tuple[frozenset[int], frozenset[int]]] = []
    for index, (text, guess) in enumerate(zip(labels, predicted)):
        try:
            truth = wl.label_classes(text)
        except ValueError as error:
            raise ValueError(f"wafer {index}: {error}") from error
        pairs.append((truth, _predicted_classes(guess, index)))
    support, precision, recall, f1 = {}, {}, {}, {}
    for cls in DEFECT_CLASSES:
        tp = sum(cls in truth and cls in guess for truth, guess in pairs)
        fp = sum(cls not in truth and cls in guess for truth, guess in pairs)
        fn = sum(cls in truth and cls not in guess for truth, guess in pairs)
        if tp + fp + fn:
            name = CLASS_NAMES[cls]
            support[name] = tp + fn
            precision[name] = _ratio(tp, tp + fp) or 0.0
            recall[name] = _ratio(tp, tp + fn) or 0.0
            f1[name] = 2 * tp / (2 * tp + fp + fn)
    wrong = Counter((wl.patterns_text(truth), wl.patterns_text(guess)) for truth, guess in pairs if truth != guess)
    ranked = sorted(wrong.items(), key=lambda item: (-item[1], item[0]))[:MOST_CONFUSED]
    return {"kind": "mixed", "wafers": len(pairs),
            "exact_match": sum(truth == guess for truth, guess in pairs) / len(pairs),
            "support": support, "precision": precision, "recall": recall, "f1": f1,
            "macro_f1": float(np.mean(list(f1.values()))) if f1 else None,
            "most_confused": [{"truth": truth, "predicted": guess, "wafers": n} for (truth, guess), n in ranked]}


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(float(value), DIGITS)


def headline(scores: dict) -> dict:
    """The numbers `dvc metrics` compares across runs: rounded, without the confusion or the confused sets."""
    if scores.get("kind") == "wm811k":
        return {"wafers": scores["wafers"], "accuracy": _rounded(scores["accuracy"]),
                "balanced_accuracy": _rounded(scores["balanced_accuracy"]),
                "false_alarm_rate": _rounded(scores["false_alarm_rate"]),
                "recall": {label: _rounded(value) for label, value in scores["recall"].items()}}
    if scores.get("kind") == "mixed":
        return {"wafers": scores["wafers"], "exact_match": _rounded(scores["exact_match"]),
                "macro_f1": _rounded(scores["macro_f1"]),
                **{key: {name: _rounded(value) for name, value in scores[key].items()}
                   for key in ("precision", "recall", "f1")}}
    raise ValueError(f"scores of unknown kind {scores.get('kind')!r}; expected those of wm811k_scores or mixed_scores")


def _share(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def scores_table_md(scores: dict) -> str:
    """A markdown table for the README and the CLI: per label (or class) first, then the summary rows."""
    if scores.get("kind") == "wm811k":
        lines = ["| WM-811K label | wafers | expected dominant_class | recall |", "|---|---:|---|---:|"]
        lines += [f"| {label} | {n:,} | {wl.expected_dominant(label)} | {_share(scores['recall'][label])} |"
                  for label, n in scores["counts"].items()]
        lines += [f"| **balanced accuracy** | {scores['wafers']:,} | | {_share(scores['balanced_accuracy'])} |",
                  f"| **accuracy** | {scores['wafers']:,} | | {_share(scores['accuracy'])} |",
                  f"| **false-alarm rate** (none/Random/Near-full given a pattern) | "
                  f"{scores['false_alarm_wafers']:,} | | {_share(scores['false_alarm_rate'])} |"]
        return "\n".join(lines) + "\n"
    if scores.get("kind") == "mixed":
        lines = ["| class | wafers with it | precision | recall | F1 |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {name} | {scores['support'][name]:,} | {_share(scores['precision'][name])} | "
                  f"{_share(scores['recall'][name])} | {_share(scores['f1'][name])} |" for name in scores["f1"]]
        lines += [f"| **macro F1** | | | | {_share(scores['macro_f1'])} |",
                  f"| **exact match of the set** | {scores['wafers']:,} | | | {_share(scores['exact_match'])} |"]
        return "\n".join(lines) + "\n"
    raise ValueError(f"scores of unknown kind {scores.get('kind')!r}; expected those of wm811k_scores or mixed_scores")


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_wm811k_confusion(scores: dict, path: Path, title: str = "WM-811K label vs predicted dominant_class") -> Path:
    """Row-normalised 9x5 heat map (share of each label) with counts; the expected cell of each row is outlined,
    so the recall of every label reads off the outlined cell."""
    matrix = np.asarray(scores["confusion"], dtype=np.int64)
    rows, cols = scores["labels"], scores["outcomes"]
    totals = matrix.sum(axis=1, keepdims=True)
    shares = np.divide(matrix, totals, out=np.zeros(matrix.shape), where=totals > 0)
    fig, axis = plt.subplots(figsize=(6.4, 6.2))
    image = axis.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for row, label in enumerate(rows):
        for col in range(len(cols)):
            colour = "white" if shares[row, col] > 0.5 else "black"
            axis.text(col, row, f"{matrix[row, col]:,}\n{shares[row, col]:.0%}", ha="center", va="center",
                      fontsize=7, color=colour)
        expected = cols.index(wl.expected_dominant(label))
        axis.add_patch(plt.Rectangle((expected - 0.5, row - 0.5), 1, 1, fill=False, edgecolor="darkorange", lw=2))
    axis.set_xticks(range(len(cols)), cols, rotation=30, ha="right")
    axis.set_yticks(range(len(rows)), [f"{label} ({int(n):,})" for label, n in zip(rows, totals[:, 0])])
    axis.set_xlabel("predicted dominant_class")
    axis.set_ylabel("WM-811K label (wafers)")
    axis.set_title(title, fontsize=10)
    fig.colorbar(image, ax=axis, fraction=0.046, label="share of label")
    fig.tight_layout()
    return _save(fig, path)


def plot_mixed_presence(scores: dict, path: Path, title: str = "Pattern presence per class") -> Path:
    """Per-class presence precision/recall/F1 bars beside the most confused (truth -> predicted) sets."""
    fig, (bars, confused) = plt.subplots(1, 2, figsize=(12, 4.8), gridspec_kw={"width_ratios": [1, 1.3]})
    names = list(scores["f1"])
    x = np.arange(len(names))
    for offset, key in zip((-0.27, 0.0, 0.27), ("precision", "recall", "f1")):
        values = [scores[key][name] for name in names]
        drawn = bars.bar(x + offset, values, width=0.27, label=key)
        bars.bar_label(drawn, fmt="%.2f", fontsize=7)
    bars.set_xticks(x, [f"{name}\n({scores['support'][name]:,})" for name in names])
    bars.set_ylim(0, 1.25)
    bars.set_ylabel("presence score (wafers)")
    bars.set_title(f"exact match {_share(scores['exact_match'])}, macro F1 {_share(scores['macro_f1'])}",
                   fontsize=9)
    bars.legend(fontsize=8, loc="upper center", ncol=3)
    pairs = scores["most_confused"]
    if pairs:
        y = np.arange(len(pairs))
        counts = [pair["wafers"] for pair in pairs]
        confused.barh(y, counts, color="indianred")
        confused.set_yticks(y, [f"{pair['truth']} -> {pair['predicted']}" for pair in pairs], fontsize=8)
        confused.invert_yaxis()
        for row, n in zip(y, counts):
            confused.text(n, row, f" {n:,}", va="center", fontsize=7)
        confused.set_xlabel("wafers")
    else:
        confused.text(0.5, 0.5, "no wafer with a wrong pattern set", ha="center", va="center")
        confused.set_axis_off()
    confused.set_title("most confused sets (truth -> predicted)", fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


# --- one real set, by name -------------------------------------------------------------------

# How each real set is scored, and the number that ranks models on it (selection, calibration, the gate).
SET_KIND = {"wm811k": "wm811k", "mixedwm38": "mixed"}
MAIN_SCORE = {"wm811k": "balanced_accuracy", "mixed": "exact_match"}


def score_set(name: str, labels: Sequence[str], patterns: Sequence[str], dominant: Sequence[str]) -> dict:
    """The scores of the real set `name`: WM-811K by dominant class, MixedWM38 by pattern set."""
    if SET_KIND.get(name) == "wm811k":
        return wm811k_scores(labels, dominant)
    if SET_KIND.get(name) == "mixed":
        return mixed_scores(labels, patterns)
    raise ValueError(f"unknown real set {name!r}; expected one of {sorted(SET_KIND)}")


def main_score(scores: dict) -> float:
    return float(scores[MAIN_SCORE[scores["kind"]]])


def calibration_objective(scores: Sequence[dict], max_false_alarms: float | None, penalty: float,
                          synthetic_miou: float | None = None) -> float:
    """What the decision's offsets are fitted to: the mean of the real sets' main scores (and of the synthetic
    val mIoU, when given: the selection score's parts), less `penalty` per unit of false alarms above
    `max_false_alarms` in a set that counts them (WM-811K). Balanced accuracy alone lets a quarter of the none
    wafers raise alarms for a point of recall elsewhere; a yield engineer would not."""
    parts = [main_score(s) for s in scores] + ([] if synthetic_miou is None else [synthetic_miou])
    value = float(np.mean(parts))
    if max_false_alarms is None:
        return value
    excess = sum(max(0.0, s["false_alarm_rate"] - max_false_alarms) for s in scores
                 if s.get("false_alarm_rate") is not None)
    return value - penalty * excess


def flat_metrics(scores: dict, prefix: str) -> dict[str, float]:
    """The headline as flat `prefix_key` floats for MLflow (per-label values as `prefix_recall_Edge-Loc`)."""
    flat = {}
    for key, value in headline(scores).items():
        if isinstance(value, dict):
            flat.update({f"{prefix}_{key}_{name}": float(v) for name, v in value.items() if v is not None})
        elif value is not None:
            flat[f"{prefix}_{key}"] = float(value)
    return flat


def main_score_noise(scores: dict) -> float:
    """Standard error of `main_score` from the wafer counts: binomial per label, averaged for balanced accuracy."""
    if scores["kind"] == "wm811k":
        recalls = scores["recall"]
        variance = sum(r * (1 - r) / scores["counts"][label] for label, r in recalls.items())
        return float(math.sqrt(variance) / len(recalls))
    p = scores["exact_match"]
    return float(math.sqrt(p * (1 - p) / scores["wafers"]))


def write_real_reports(scores_by_split: dict[str, dict[str, dict]], out_dir: Path) -> list[Path]:
    """Per split and real set: the confusion or presence plot (`real_<split>_<set>.png`) and one markdown file
    of every table (`real_scores.md`). Returns the files written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written, sections = [], []
    for split, by_set in scores_by_split.items():
        for name, scores in by_set.items():
            path = out_dir / f"real_{split}_{name}.png"
            title = f"{name} {split}: {scores['wafers']} real wafers"
            plot = plot_wm811k_confusion if scores["kind"] == "wm811k" else plot_mixed_presence
            written.append(plot(scores, path, title))
            sections.append(f"### {name}, {split} ({scores['wafers']} wafers)\n\n{scores_table_md(scores)}\n")
    table = out_dir / "real_scores.md"
    table.write_text("\n".join(sections))
    return [*written, table]
