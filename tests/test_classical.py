"""The rule-based segmenter on hand-drawn patterns over light random fails, and on synthetic wafers."""

import dataclasses

import numpy as np
import pytest
from skimage import draw

from benchmarks import classical  # the repo root is on sys.path under `python -m pytest`
from pipeline import synth
from pipeline.evaluate import evaluate_predictions
from pipeline.params import SynthParams
from pipeline.wafer import CLASS_NAMES, FAIL, OFF_WAFER, PASS

SIDE = 48
RING, SCRATCH, LOCAL_ZONE, CIRCLE = (CLASS_NAMES.index(n) for n in ("ring", "scratch", "local_zone", "circle"))


def blank_wafer(seed: int, fail_rate: float = 0.03) -> tuple[np.ndarray, np.ndarray, np.random.Generator]:
    """A round SIDE x SIDE wafer with random fails at `fail_rate`, and the normalised radius of each die."""
    rng = np.random.default_rng(seed)
    y, x = np.ogrid[:SIDE, :SIDE]
    radius = np.hypot((y + 0.5) / SIDE * 2 - 1, (x + 0.5) / SIDE * 2 - 1)
    wafer = np.where(radius <= 1, PASS, OFF_WAFER).astype(np.uint8)
    wafer[(radius <= 1) & (rng.random(wafer.shape) < fail_rate)] = FAIL
    return wafer, radius, rng


def with_pattern(wafer: np.ndarray, region: np.ndarray, rng: np.random.Generator, density: float) -> np.ndarray:
    """Fail `density` of the region's on-wafer dies; returns the true mask of those dies."""
    produced = region & (wafer != OFF_WAFER) & (rng.random(wafer.shape) < density)
    wafer[produced] = FAIL
    return produced


def share_labelled(prediction: np.ndarray, dies: np.ndarray, class_id: int) -> float:
    return float((prediction[dies] == class_id).mean())


def test_edge_ring_is_labelled_ring():
    wafer, radius, rng = blank_wafer(seed=1)
    ring = with_pattern(wafer, radius >= 0.88, rng, density=0.7)
    prediction = classical.segment(wafer)
    assert share_labelled(prediction, ring, RING) >= 0.8


def test_partial_donut_is_labelled_ring_and_its_hole_is_not():
    wafer, radius, rng = blank_wafer(seed=2)
    y, x = np.ogrid[:SIDE, :SIDE]
    arc = np.arctan2(y - SIDE / 2 + 0.5, x - SIDE / 2 + 0.5) < 1.5  # about 240 degrees of the annulus
    donut = with_pattern(wafer, (np.abs(radius - 0.55) <= 0.08) & arc, rng, density=0.8)
    prediction = classical.segment(wafer)
    assert share_labelled(prediction, donut, RING) >= 0.7
    hole_fails = (radius < 0.3) & (wafer == FAIL)
    assert share_labelled(prediction, hole_fails, 0) == 1.0


def test_thin_scratch_is_labelled_scratch():
    wafer, _, rng = blank_wafer(seed=3)
    line = np.zeros(wafer.shape, dtype=bool)
    line[draw.line(10, 12, 36, 30)] = True
    scratch = with_pattern(wafer, line, rng, density=0.95)
    prediction = classical.segment(wafer)
    assert share_labelled(prediction, scratch, SCRATCH) >= 0.7


def test_central_disc_is_labelled_circle():
    wafer, radius, rng = blank_wafer(seed=4)
    circle = with_pattern(wafer, radius <= 0.3, rng, density=0.6)
    prediction = classical.segment(wafer)
    assert share_labelled(prediction, circle, CIRCLE) >= 0.8


def test_blob_at_the_edge_is_labelled_local_zone():
    wafer, _, rng = blank_wafer(seed=5)
    y, x = np.ogrid[:SIDE, :SIDE]
    blob = np.hypot(y - 8, x - 30) <= 6  # near the top edge, off centre
    zone = with_pattern(wafer, blob, rng, density=0.7)
    prediction = classical.segment(wafer)
    assert share_labelled(prediction, zone, LOCAL_ZONE) >= 0.7


def test_random_fails_stay_background_and_passing_dies_are_never_labelled():
    wafer, _, _ = blank_wafer(seed=6, fail_rate=0.05)
    prediction = classical.segment(wafer)
    assert prediction.dtype == np.uint8 and prediction.shape == wafer.shape
    assert (prediction[wafer != FAIL] == 0).all()
    assert share_labelled(prediction, wafer == FAIL, 0) >= 0.9


def test_wafer_without_fails_is_all_background():
    wafer, _, _ = blank_wafer(seed=7, fail_rate=0.0)
    assert not classical.segment(wafer).any()


def test_rules_are_frozen_and_change_the_result():
    with pytest.raises(dataclasses.FrozenInstanceError):
        classical.DEFAULT_RULES.min_blob_dies = 1  # type: ignore[misc]
    wafer, radius, rng = blank_wafer(seed=4)
    circle = with_pattern(wafer, radius <= 0.3, rng, density=0.6)
    no_blobs = dataclasses.replace(classical.DEFAULT_RULES, min_blob_dies=10_000)
    assert share_labelled(classical.segment(wafer, no_blobs), circle, CIRCLE) == 0.0


def test_synthetic_wafers_score_well_above_all_background():
    """On generated wafers (all pattern kinds, the default background) the rules find most patterns."""
    wafers = list(synth.generate(SynthParams(), seed=3, n=100))
    _, metrics = evaluate_predictions(wafers, [classical.segment(w.map) for w in wafers])
    assert metrics["defect_miou"] > 0.35
    assert metrics["iou"][RING] > 0.4 and metrics["iou"][CIRCLE] > 0.5
