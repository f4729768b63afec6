"""The synthetic generator (pipeline/synth.py): contract, determinism, pattern geometry, calibration."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from skimage.measure import label, regionprops

from pipeline.params import ParamsError, SynthParams, parse_params
from pipeline.synth import (
    CLASS_ID,
    EDGE_STAT_RADIUS,
    STAT_NAMES,
    compare_real,
    die_geometry,
    generate,
    ks_statistic,
    plot_comparison,
    wafer_stats,
)
from pipeline.wafer import FAIL, NUM_CLASSES, OFF_WAFER, Wafer, validate_wafer

REAL_DIE_TABLE = Path(__file__).resolve().parents[1] / "real_data/wm811k/unlabeled_lots.parquet"
KINDS = tuple(CLASS_ID)


def merged(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def synth_params(**update: Any) -> SynthParams:
    return SynthParams.model_validate(merged(SynthParams().model_dump(), update))


def only_kind(kind: str, **kind_update: Any) -> SynthParams:
    """Every wafer carries exactly one pattern of `kind`."""
    weights = {k: float(k == kind) for k in KINDS}
    return synth_params(patterns={"count_probs": (0, 1, 0, 0), "kind_weights": weights, kind: kind_update})


def class_dies(wafer: Wafer, kind: str) -> np.ndarray:
    return wafer.mask == CLASS_ID[kind]


@pytest.fixture(scope="module")
def default_wafers() -> list[Wafer]:
    return list(generate(SynthParams(), seed=11, n=600))


# --- contract --------------------------------------------------------------------------------


def test_same_seed_gives_identical_wafers_and_other_seeds_differ() -> None:
    params = SynthParams()
    first, again = list(generate(params, 5, 60)), list(generate(params, 5, 60))
    other = list(generate(params, 6, 60))
    for a, b in zip(first, again, strict=True):
        assert (a.lot_id, a.wafer_id) == (b.lot_id, b.wafer_id)
        assert np.array_equal(a.map, b.map) and np.array_equal(a.mask, b.mask)
    assert any(a.shape != c.shape or not np.array_equal(a.map, c.map) for a, c in zip(first, other))


def test_shorter_run_is_a_prefix_of_a_longer_one() -> None:
    params = SynthParams()
    short, long = list(generate(params, 3, 30)), list(generate(params, 3, 80))
    for a, b in zip(short, long):
        assert np.array_equal(a.map, b.map) and np.array_equal(a.mask, b.mask)


def test_wafers_come_in_lots_sharing_one_shape() -> None:
    params = synth_params(wafers_per_lot=7, lot_prefix="T")
    wafers = list(generate(params, 4, 30))
    assert len(wafers) == 30 and len(list(generate(params, 4))) == params.n_wafers
    lots: dict[str, list[Wafer]] = {}
    for wafer in wafers:
        lots.setdefault(wafer.lot_id, []).append(wafer)
    assert list(lots) == [f"T4-{k:05d}" for k in range(5)]
    for members in lots.values():
        assert [w.wafer_id for w in members] == [f"{i:02d}" for i in range(1, len(members) + 1)]
        assert len({w.shape for w in members}) == 1
        assert all(np.array_equal(w.map != OFF_WAFER, members[0].map != OFF_WAFER) for w in members)
    assert [len(m) for m in lots.values()] == [7, 7, 7, 7, 2]


def test_every_wafer_validates_and_masks_label_only_failing_dies(default_wafers: list[Wafer]) -> None:
    for wafer in default_wafers:
        checked = validate_wafer(wafer.lot_id, wafer.wafer_id, wafer.map, wafer.mask)
        assert checked.map.dtype == np.uint8 and checked.mask.dtype == np.uint8
        assert wafer.map.max() <= FAIL and wafer.mask.max() < NUM_CLASSES
        assert not (wafer.mask[wafer.map != FAIL]).any(), "a passing or off-wafer die carries a class"


def test_pattern_count_is_0_to_3_and_all_kinds_occur(default_wafers: list[Wafer]) -> None:
    classes_per_wafer = [len(set(np.unique(w.mask)) - {0}) for w in default_wafers]
    assert set(classes_per_wafer) == {0, 1, 2, 3}
    seen = set().union(*(set(np.unique(w.mask)) for w in default_wafers))
    assert seen == set(range(NUM_CLASSES))
    no_patterns = synth_params(patterns={"count_probs": (1, 0, 0, 0)})
    assert not any(w.mask.any() for w in generate(no_patterns, 0, 50))
    three = synth_params(patterns={"count_probs": (0, 0, 0, 1)})
    assert max(len(set(np.unique(w.mask)) - {0}) for w in generate(three, 0, 100)) == 3


def test_sizes_stay_in_range_and_vary(default_wafers: list[Wafer]) -> None:
    size = SynthParams().size
    rows = np.array([w.shape[0] for w in default_wafers])
    cols = np.array([w.shape[1] for w in default_wafers])
    assert rows.min() >= size.side_min and cols.min() >= size.side_min
    assert max(rows.max(), cols.max()) <= size.side_max
    assert len({w.shape for w in default_wafers}) >= 15
    assert 25 <= np.median(np.maximum(rows, cols)) <= 70
    narrow = synth_params(size={"side_median": 30, "side_log_sigma": 2.0, "side_min": 24, "side_max": 40})
    shapes = {w.shape for w in generate(narrow, 1, 500)}
    assert all(24 <= side <= 40 for shape in shapes for side in shape)


def test_shape_override_and_fixed_shape() -> None:
    assert {w.shape for w in generate(SynthParams(), 0, 60, shape=(64, 48))} == {(64, 48)}
    fixed = synth_params(size={"fixed_shape": (30, 33)})
    assert {w.shape for w in generate(fixed, 0, 30)} == {(30, 33)}


def test_flat_and_notch_take_dies_off_inside_the_ellipse() -> None:
    def off_inside_disc(params: SynthParams) -> list[int]:
        counts = []
        for wafer in generate(params, 2, 200):
            if wafer.wafer_id == "01":
                disc = die_geometry(*wafer.shape).disc
                assert not (wafer.map[~disc]).any(), "a die outside the inscribed ellipse is on-wafer"
                counts.append(int(np.count_nonzero(disc & (wafer.map == OFF_WAFER))))
        return counts

    assert all(c > 0 for c in off_inside_disc(synth_params(edge_cut={"p_flat": 1.0, "p_notch": 0.0})))
    assert all(c > 0 for c in off_inside_disc(synth_params(edge_cut={"p_flat": 0.0, "p_notch": 1.0})))
    assert all(c == 0 for c in off_inside_disc(synth_params(edge_cut={"p_flat": 0.0, "p_notch": 0.0})))


def test_background_fails_rise_towards_the_edge() -> None:
    params = synth_params(patterns={"count_probs": (1, 0, 0, 0)})
    wafers = list(generate(params, 9, 300, shape=(48, 48)))
    radius = die_geometry(48, 48).radius
    fails = np.mean([w.map == FAIL for w in wafers], axis=0)
    on = wafers[0].map != OFF_WAFER
    assert fails[on & (radius >= 0.95)].mean() > 2 * fails[on & (radius < 0.7)].mean()


def test_bad_edge_cut_probabilities_are_refused() -> None:
    with pytest.raises(ParamsError, match="p_flat"):
        parse_params({"synth": {"edge_cut": {"p_flat": 0.7, "p_notch": 0.5}}})


# --- pattern geometry ------------------------------------------------------------------------


def test_edge_rings_lie_at_large_radius_and_donuts_inside() -> None:
    edge = only_kind("ring", p_donut=0.0, edge_width={"lo": 0.05, "hi": 0.12})
    donut = only_kind("ring", p_donut=1.0, donut_radius={"lo": 0.4, "hi": 0.6}, donut_width={"lo": 0.1, "hi": 0.2})
    for wafer in generate(edge, 1, 100):
        radius = die_geometry(*wafer.shape).radius[class_dies(wafer, "ring")]
        assert radius.size and radius.min() >= 1 - 0.12 - 1e-6
    for wafer in generate(donut, 1, 100):
        radius = die_geometry(*wafer.shape).radius[class_dies(wafer, "ring")]
        assert radius.size and 0.3 - 1e-6 <= radius.min() and radius.max() <= 0.7 + 1e-6


def test_partial_rings_cover_only_an_arc() -> None:
    params = only_kind("ring", p_donut=0.0, p_partial=1.0, arc_span_deg={"lo": 90, "hi": 120}, density={"lo": 1, "hi": 1})
    for wafer in generate(params, 2, 50, shape=(60, 60)):
        geometry = die_geometry(60, 60)
        band = (wafer.map != OFF_WAFER) & (geometry.radius >= 1 - SynthParams().patterns.ring.edge_width.lo)
        covered = np.count_nonzero(class_dies(wafer, "ring") & band) / np.count_nonzero(band)
        assert 0.15 < covered < 0.45


def test_circles_sit_near_the_centre() -> None:
    params = only_kind("circle", radius={"lo": 0.15, "hi": 0.3}, centre_jitter=0.02)
    for wafer in generate(params, 3, 100):
        radius = die_geometry(*wafer.shape).radius[class_dies(wafer, "circle")]
        assert radius.size and radius.max() <= 0.3 + 0.1


def test_scratches_are_thin_elongated_lines() -> None:
    params = only_kind("scratch", segments={"lo": 1, "hi": 1}, length={"lo": 0.6, "hi": 1.0},
                       start_radius=0.3, density={"lo": 1, "hi": 1})
    wide_seen = False
    for wafer in generate(params, 4, 100, shape=(64, 64)):
        components = regionprops(label(class_dies(wafer, "scratch"), connectivity=2))
        line = max(components, key=lambda c: c.area)
        assert line.axis_minor_length <= 3.0
        assert line.axis_major_length >= 4 * max(line.axis_minor_length, 1.0)
        wide_seen |= line.axis_minor_length > 1.5
    assert wide_seen, "no two-die-wide scratch among 100"


def test_local_zones_are_compact_blobs_often_at_the_edge() -> None:
    zone = SynthParams().patterns.local_zone
    params = only_kind("local_zone", p_edge=1.0, density={"lo": 1, "hi": 1})
    reach = zone.radius.hi * (1 + zone.irregularity.hi)
    for wafer in generate(params, 5, 100, shape=(50, 50)):
        dies = class_dies(wafer, "local_zone")
        if not dies.any():
            continue
        rows, cols = np.nonzero(dies)
        assert (np.ptp(rows) + 1) * 2 / 50 <= 2 * reach + 0.1 and (np.ptp(cols) + 1) * 2 / 50 <= 2 * reach + 0.1
        assert die_geometry(50, 50).radius[dies].max() >= 0.8


# --- calibration -----------------------------------------------------------------------------


def test_wafer_stats_on_a_known_map() -> None:
    geometry = die_geometry(20, 20)
    wafer_map = np.where(geometry.disc, 1, 0).astype(np.uint8)
    assert math.isnan(wafer_stats(wafer_map)["edge_fail_fraction"])
    edge = geometry.disc & (geometry.radius >= EDGE_STAT_RADIUS)
    wafer_map[edge] = FAIL
    wafer_map[10, 10] = FAIL
    stats = wafer_stats(wafer_map)
    n_fail = np.count_nonzero(edge) + 1
    assert stats["rows"] == stats["cols"] == 20
    assert stats["fail_fraction"] == pytest.approx(n_fail / np.count_nonzero(geometry.disc))
    assert stats["edge_fail_fraction"] == pytest.approx((n_fail - 1) / n_fail)


def test_ks_statistic() -> None:
    a = np.arange(100.0)
    assert ks_statistic(a, a) == 0.0
    assert ks_statistic(a, a + 1000) == 1.0
    assert ks_statistic(a, a[:50]) == pytest.approx(0.5)


def check_comparison(table: pd.DataFrame) -> None:
    figures = [f"{side}_{q}" for side in ("real", "synth") for q in ("p10", "p50", "p90", "mean")]
    assert list(table.index) == list(STAT_NAMES)
    assert list(table.columns) == [*figures, "ks", "n_real", "n_synth"]
    assert np.isfinite(table[[*figures, "ks"]].to_numpy(float)).all()
    assert table["ks"].between(0, 1).all()


def real_maps(n_lots: int) -> list[np.ndarray]:
    table = pd.read_parquet(REAL_DIE_TABLE)
    table = table[table["lot_id"].isin(table["lot_id"].unique()[:n_lots])]
    maps = []
    for _, dies in table.groupby(["lot_id", "wafer_id"]):
        wafer_map = np.zeros((dies["row"].max() + 1, dies["col"].max() + 1), dtype=np.uint8)
        wafer_map[dies["row"], dies["col"]] = dies["bin"]
        maps.append(wafer_map)
    return maps


@pytest.mark.slow
def test_compare_real_against_synthetic_wafers_and_maps(tmp_path: Path, default_wafers: list[Wafer]) -> None:
    other = [w.map for w in generate(SynthParams(), 12, 100)]
    table = compare_real(other, default_wafers[:200])
    check_comparison(table)
    assert table.loc["fail_fraction", "ks"] < 0.3
    png = plot_comparison(other, default_wafers[:200], tmp_path / "plots" / "cmp.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.skipif(not REAL_DIE_TABLE.exists(), reason="real WM-811K die table not present")
@pytest.mark.slow
def test_compare_real_on_a_small_real_sample(tmp_path: Path, default_wafers: list[Wafer]) -> None:
    real = real_maps(40)
    table = compare_real(real, default_wafers)
    check_comparison(table)
    assert table.loc["fail_fraction", "n_real"] == len(real)
    assert plot_comparison(real, default_wafers, tmp_path / "real.png").stat().st_size > 10_000


@pytest.mark.slow
def test_plot_copes_with_a_statistic_holding_one_value(tmp_path: Path) -> None:
    wafers = list(generate(SynthParams(), 1, 30, shape=(32, 32)))
    check_comparison(compare_real(wafers[:15], wafers[15:]))
    assert plot_comparison(wafers[:15], wafers[15:], tmp_path / "same.png").exists()
