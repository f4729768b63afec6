"""The wafer-level decision: which defect classes are present on a wafer, and a mask that agrees with it.

The FCN's score maps give, per failing die, each defect class's margin over background. A class is
present when its pooled margin (model.presence_logits) plus its presence offset is positive; only present
classes may claim dies, and a die goes to the present class with the largest positive margin plus claim
offset. So every class in a wafer's `patterns` has dies in its mask, and `dominant_class` is the one with
the most. Offsets are (2, 4): row PRESENCE and row CLAIM, one column per defect class (a (4,) vector is
both rows). They are calibrated on real val wafers (`calibrate_offsets`) and saved with the model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.labels import NONE, patterns_text
from pipeline.model import presence_logits
from pipeline.wafer import CLASS_NAMES, DEFECT_CLASSES, FAIL, NUM_CLASSES, OFF_WAFER, Wafer, class_die_counts

log = logging.getLogger(__name__)

PRESENCE, CLAIM = 0, 1  # rows of the offsets
OFFSETS_SHAPE = (2, len(DEFECT_CLASSES))


def decide_masks(logits: torch.Tensor, maps: torch.Tensor, offsets: torch.Tensor, sharpness: float) -> torch.Tensor:
    """uint8 masks (N, H, W) from logits (N, 5, H, W) of padded maps (N, H, W) under the decision rule."""
    fail = maps.to(logits.device) == FAIL
    shift = offsets.to(logits.device, torch.float32).broadcast_to(OFFSETS_SHAPE)
    present = presence_logits(logits, fail, sharpness) + shift[PRESENCE] > 0  # (N, 4)
    margins = (logits[:, 1:] - logits[:, :1]).float() + shift[CLAIM, None, :, None, None]
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
    die, its wafer's position (D,) and its four margins over background, one row per class (4, D): the
    calibration decides thousands of times, and whole rows are what numpy runs fast."""

    presence: np.ndarray
    wafer_of_die: np.ndarray
    margins: np.ndarray

    @classmethod
    def gather(cls, logits: torch.Tensor, maps: torch.Tensor, sharpness: float) -> Evidence:
        fail = maps.to(logits.device) == FAIL
        presence = presence_logits(logits, fail, sharpness).cpu().numpy()
        margins = (logits[:, 1:] - logits[:, :1]).float().permute(1, 0, 2, 3)[:, fail]  # (4, D)
        wafer_of_die = torch.nonzero(fail)[:, 0]
        return cls(presence, wafer_of_die.cpu().numpy(), margins.cpu().numpy())

    @classmethod
    def concatenate(cls, parts: Sequence[Evidence]) -> Evidence:
        starts = np.cumsum([0, *[len(p.presence) for p in parts[:-1]]])
        return cls(np.concatenate([p.presence for p in parts]),
                   np.concatenate([p.wafer_of_die + s for p, s in zip(parts, starts)]),
                   np.concatenate([p.margins for p in parts], axis=1))

    def reordered(self, order: np.ndarray) -> Evidence:
        """The same evidence with wafer `order[i]` as wafer i."""
        new_position = np.empty(len(order), dtype=np.int64)
        new_position[order] = np.arange(len(order))
        wafer_of_die = new_position[self.wafer_of_die]
        by_wafer = np.argsort(wafer_of_die, kind="stable")
        return Evidence(self.presence[order], wafer_of_die[by_wafer], self.margins[:, by_wafer])

    def claimable_dies(self, max_offset: float) -> np.ndarray:
        """(D,) whether a die can be claimed under claim offsets up to `max_offset`: a die whose every margin
        stays negative after the largest offset never is."""
        return self.margins.max(axis=0) + max_offset > 0

    def claimable(self, max_offset: float) -> Evidence:
        """The same decisions for any claim offsets up to `max_offset`, from fewer dies (claimable_dies)."""
        keep = self.claimable_dies(max_offset)
        return Evidence(self.presence, self.wafer_of_die[keep], self.margins[:, keep])

    def claims(self, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per die under `offsets`, the same rule as decide_masks: (defect class index 0-3, whether claimed)."""
        offsets = np.broadcast_to(np.asarray(offsets, dtype=np.float32), OFFSETS_SHAPE)
        # per wafer and class: the claim offset where the class is present, else -inf (it claims nothing)
        shift = np.where((self.presence + offsets[PRESENCE]) > 0, offsets[CLAIM], -np.inf).astype(np.float32)
        best = self.margins[0] + shift[self.wafer_of_die, 0]
        defect = np.zeros(len(best), dtype=np.int64)
        for c in range(1, len(DEFECT_CLASSES)):  # ties to the lowest class id, as decide_masks' max does
            margin = self.margins[c] + shift[self.wafer_of_die, c]
            better = margin > best
            best = np.where(better, margin, best)
            defect[better] = c
        return defect, best > 0

    def decide(self, offsets: np.ndarray, min_dies: int) -> tuple[list[str], list[str]]:
        """`patterns` and `dominant_class` of every wafer under `offsets`: the same rule as decide_masks."""
        n = len(self.presence)
        defect, claimed = self.claims(offsets)
        counts = np.bincount(self.wafer_of_die[claimed] * 4 + defect[claimed], minlength=n * 4).reshape(n, 4)
        has = counts >= min_dies
        # most dies, ties to the lowest class id: argmax finds the first maximum
        dominant = np.where(has.any(axis=1), np.argmax(np.where(has, counts, -1), axis=1) + 1, 0)
        codes = has @ (1 << np.arange(4))
        patterns = [PATTERN_TEXTS[code] for code in codes]
        return patterns, [CLASS_NAMES[d] if d else NONE for d in dominant]


PATTERN_TEXTS = [patterns_text(c + 1 for c in range(4) if code >> c & 1) for code in range(16)]


@dataclass
class MaskEvidence:
    """Wafers with true masks (synthetic val) as the calibration sees them: the Evidence of their failing dies,
    each of those dies' true class (D,), and the confusion (true, predicted) of the on-wafer dies no offset
    changes: passing dies (and dies no offset lets any class claim), always predicted background."""

    evidence: Evidence
    truth: np.ndarray
    fixed: np.ndarray

    @classmethod
    def gather(cls, evidence: Evidence, wafers: Sequence[Wafer]) -> MaskEvidence:
        """`evidence` must be of `wafers`, in their order (predict.evidence_of): its dies are each wafer's
        failing dies in row-major order, as `mask[map == FAIL]` lists them."""
        truth = np.concatenate([w.mask[w.map == FAIL] for w in wafers]).astype(np.int64)
        if len(truth) != evidence.margins.shape[1]:
            raise ValueError(f"{len(truth)} failing dies in the wafers but {evidence.margins.shape[1]} in the evidence")
        passing = np.concatenate([w.mask[(w.map != FAIL) & (w.map != OFF_WAFER)] for w in wafers]).astype(np.int64)
        fixed = np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=np.int64)
        fixed[:, 0] = np.bincount(passing, minlength=NUM_CLASSES)
        return cls(evidence, truth, fixed)

    def claimable(self, max_offset: float) -> MaskEvidence:
        """As Evidence.claimable; the dies left out count as predicted background."""
        keep = self.evidence.claimable_dies(max_offset)
        fixed = self.fixed.copy()
        fixed[:, 0] += np.bincount(self.truth[~keep], minlength=NUM_CLASSES)
        return MaskEvidence(self.evidence.claimable(max_offset), self.truth[keep], fixed)

    def confusion(self, offsets: np.ndarray) -> np.ndarray:
        """Die counts (NUM_CLASSES, NUM_CLASSES) by (true, predicted class) under `offsets`."""
        defect, claimed = self.evidence.claims(offsets)
        predicted = np.where(claimed, defect + 1, 0)
        counts = np.bincount(self.truth * NUM_CLASSES + predicted, minlength=NUM_CLASSES ** 2)
        return self.fixed + counts.reshape(NUM_CLASSES, NUM_CLASSES)


# objective(patterns, dominant, confusion of the mask evidence or None) -> the value the offsets maximise
Objective = Callable[[list[str], list[str], np.ndarray | None], float]


def calibrate_offsets(evidence: Evidence, objective: Objective, min_dies: int, grid: np.ndarray,
                      rounds: int = 3, claim_deltas: bool = True, masks: MaskEvidence | None = None
                      ) -> tuple[np.ndarray, float]:
    """Offsets (2, 4) that maximise `objective(patterns, dominant, confusion)` on the evidence, starting from
    zero; `confusion` is that of `masks` under the trial (None without them). Per class, a shared offset moves
    its presence and claims together (a faint pattern needs both) and a claim delta moves its claims alone
    (which of two present classes takes the dies): coordinate ascent over `grid` for each in turn (without
    `claim_deltas`, the shared offsets alone). Returns the offsets and the objective's value."""
    # the largest claim offset a trial can have (the start is zero): dies that stay below it are never claimed
    max_claim = max(0.0, (2 if claim_deltas else 1) * float(np.max(grid)))
    evidence = evidence.claimable(max_claim)
    masks = masks.claimable(max_claim) if masks is not None else None
    shared, delta = np.zeros(len(DEFECT_CLASSES)), np.zeros(len(DEFECT_CLASSES))

    def offsets_of(shared: np.ndarray, delta: np.ndarray) -> np.ndarray:
        return np.stack([shared, shared + delta])

    def score_of(offsets: np.ndarray) -> float:
        return objective(*evidence.decide(offsets, min_dies), masks.confusion(offsets) if masks is not None else None)

    best = score_of(offsets_of(shared, delta))
    for _ in range(rounds):
        improved = False
        for c in range(len(DEFECT_CLASSES)):
            for moved in (shared, delta) if claim_deltas else (shared,):
                for value in grid:
                    kept = moved[c]
                    moved[c] = value
                    score = score_of(offsets_of(shared, delta))
                    if score > best + 1e-9:
                        best, improved = score, True
                    else:
                        moved[c] = kept
        if not improved:
            break
    offsets = offsets_of(shared, delta)
    log.info("calibrated pattern offsets %s: objective %.4f", np.round(offsets, 3).tolist(), best)
    return offsets, best
