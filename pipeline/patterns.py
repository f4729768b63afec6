"""The wafer-level decision: which defect classes are present on a wafer, and a mask that agrees with it.

The FCN's score maps give, per failing die, each defect class's margin over background. A class is
present when its pooled margin (model.presence_logits) plus a per-class offset is positive; only present
classes may claim dies, and a die goes to the present class with the largest positive shifted margin.
So every class in a wafer's `patterns` has dies in its mask, and `dominant_class` is the one with the
most. The offsets are calibrated on real val wafers (`calibrate_offsets`) and saved with the model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.labels import NONE, patterns_text
from pipeline.model import presence_logits
from pipeline.wafer import CLASS_NAMES, DEFECT_CLASSES, FAIL, class_die_counts

log = logging.getLogger(__name__)


def decide_masks(logits: torch.Tensor, maps: torch.Tensor, offsets: torch.Tensor, sharpness: float) -> torch.Tensor:
    """uint8 masks (N, H, W) from logits (N, 5, H, W) of padded maps (N, H, W) under the decision rule."""
    fail = maps.to(logits.device) == FAIL
    shift = offsets.to(logits.device, torch.float32)
    present = presence_logits(logits, fail, sharpness) + shift > 0  # (N, 4)
    margins = (logits[:, 1:] - logits[:, :1]).float() + shift[None, :, None, None]
    margins = margins.masked_fill(~present[:, :, None, None], float("-inf"))
    best, defect = margins.max(dim=1)
    claimed = (best > 0) & fail
    return torch.where(claimed, defect + 1, 0).to(torch.uint8)


def wafer_patterns(mask: np.ndarray, wafer_map: np.ndarray, min_dies: int) -> tuple[str, str]:
    """(`patterns`, `dominant_class`) of a wafer's mask: the defect classes with at least `min_dies` dies
    joined in class-id order (or 'none'), and the one of them with most dies (ties: lowest id)."""
    return patterns_of_counts(class_die_counts(mask, wafer_map), min_dies)


def patterns_of_counts(counts: np.ndarray, min_dies: int) -> tuple[str, str]:
    """wafer_patterns from the mask's on-wafer dies per class (wafer.class_die_counts)."""
    present = [c for c in DEFECT_CLASSES if counts[c] >= min_dies]
    if not present:
        return NONE, NONE
    dominant = max(present, key=lambda c: (counts[c], -c))
    return patterns_text(present), CLASS_NAMES[dominant]


# --- calibration on real val -----------------------------------------------------------------


@dataclass
class Evidence:
    """What the decision needs of a set of wafers, gathered once: pooled presence (N, 4) and, per failing
    die, its wafer's position and its four margins over background (D, 4)."""

    presence: np.ndarray
    wafer_of_die: np.ndarray
    margins: np.ndarray

    @classmethod
    def gather(cls, logits: torch.Tensor, maps: torch.Tensor, sharpness: float) -> Evidence:
        fail = maps.to(logits.device) == FAIL
        presence = presence_logits(logits, fail, sharpness).cpu().numpy()
        margins = (logits[:, 1:] - logits[:, :1]).float().permute(0, 2, 3, 1)[fail]  # (D, 4)
        wafer_of_die = torch.nonzero(fail)[:, 0]
        return cls(presence, wafer_of_die.cpu().numpy(), margins.cpu().numpy())

    @classmethod
    def concatenate(cls, parts: Sequence[Evidence]) -> Evidence:
        starts = np.cumsum([0, *[len(p.presence) for p in parts[:-1]]])
        return cls(np.concatenate([p.presence for p in parts]),
                   np.concatenate([p.wafer_of_die + s for p, s in zip(parts, starts)]),
                   np.concatenate([p.margins for p in parts]))

    def reordered(self, order: np.ndarray) -> Evidence:
        """The same evidence with wafer `order[i]` as wafer i."""
        new_position = np.empty(len(order), dtype=np.int64)
        new_position[order] = np.arange(len(order))
        wafer_of_die = new_position[self.wafer_of_die]
        by_wafer = np.argsort(wafer_of_die, kind="stable")
        return Evidence(self.presence[order], wafer_of_die[by_wafer], self.margins[by_wafer])

    def claimable(self, max_offset: float) -> Evidence:
        """The same decisions for any offsets up to `max_offset`, from fewer dies: a die whose every margin
        stays negative after the largest offset can never be claimed."""
        keep = self.margins.max(axis=1) + max_offset > 0
        return Evidence(self.presence, self.wafer_of_die[keep], self.margins[keep])

    def decide(self, offsets: np.ndarray, min_dies: int) -> tuple[list[str], list[str]]:
        """`patterns` and `dominant_class` of every wafer under `offsets`: the same rule as decide_masks."""
        n = len(self.presence)
        offsets = np.asarray(offsets, dtype=np.float32)
        present = (self.presence + offsets) > 0
        margins = np.where(present[self.wafer_of_die], self.margins + offsets, -np.inf)
        defect = margins.argmax(axis=1)
        claimed = margins[np.arange(len(defect)), defect] > 0
        counts = np.bincount(self.wafer_of_die[claimed] * 4 + defect[claimed], minlength=n * 4).reshape(n, 4)
        has = counts >= min_dies
        # most dies, ties to the lowest class id: argmax finds the first maximum
        dominant = np.where(has.any(axis=1), np.argmax(np.where(has, counts, -1), axis=1) + 1, 0)
        codes = has @ (1 << np.arange(4))
        patterns = [PATTERN_TEXTS[code] for code in codes]
        return patterns, [CLASS_NAMES[d] if d else NONE for d in dominant]


PATTERN_TEXTS = [patterns_text(c + 1 for c in range(4) if code >> c & 1) for code in range(16)]
Objective = Callable[[list[str], list[str]], float]


def calibrate_offsets(evidence: Evidence, objective: Objective, min_dies: int, grid: np.ndarray,
                      rounds: int = 3) -> tuple[np.ndarray, float]:
    """Per-class offsets that maximise `objective(patterns, dominant)` on the evidence: coordinate ascent
    over `grid`, one class at a time, starting from zero. Returns the offsets and the objective's value."""
    evidence = evidence.claimable(float(np.max(grid)))
    offsets = np.zeros(len(DEFECT_CLASSES))
    best = objective(*evidence.decide(offsets, min_dies))
    for _ in range(rounds):
        improved = False
        for c in range(len(offsets)):
            for value in grid:
                trial = offsets.copy()
                trial[c] = value
                score = objective(*evidence.decide(trial, min_dies))
                if score > best + 1e-9:
                    best, offsets, improved = score, trial, True
        if not improved:
            break
    log.info("calibrated pattern offsets %s: objective %.4f", np.round(offsets, 3).tolist(), best)
    return offsets, best
