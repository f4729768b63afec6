"""Synthetic labelled wafer maps, and their calibration against real ones.

Geometry: the on-wafer region is the ellipse inscribed in the die grid. Die (i, j) of an HxW grid sits at
normalised coordinates y = (i + 0.5) / H * 2 - 1, x = (j + 0.5) / W * 2 - 1, so the wafer is the unit
circle and the normalised radius sqrt(y^2 + x^2) is 1 at the edge whatever the grid's aspect.

Speed: each wafer gets one uniform field u. A die fails at random where u < p_background, and a pattern
produces failing dies where its region holds and u < its density; only those dies carry its class in the
mask. Everything per lot (shape, flat/notch, background rates) is drawn once for the lot's wafers, as one
array, and per-shape geometry is cached.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.params import (
    BackgroundParams,
    CircleParams,
    EdgeCutParams,
    LocalZoneParams,
    Range,
    RingParams,
    ScratchParams,
    SizeParams,
    SynthParams,
)
from pipeline.wafer import CLASS_NAMES, FAIL, OFF_WAFER, Wafer

PATTERN_KINDS: tuple[str, ...] = ("ring", "scratch", "local_zone", "circle")
CLASS_ID: dict[str, int] = {name: CLASS_NAMES.index(name) for name in PATTERN_KINDS}

# wafer_stats: a fail counts as an edge fail from this normalised radius outwards (about the outer
# quarter of a wafer's dies lies there).
EDGE_STAT_RADIUS = 0.85
STAT_NAMES: tuple[str, ...] = ("rows", "cols", "fail_fraction", "edge_fail_fraction")


# --- geometry ------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class DieGeometry:
    """Read-only per-shape arrays: normalised coordinates, radius, angle and the inscribed disc."""

    y: np.ndarray  # (rows, 1)
    x: np.ndarray  # (1, cols)
    radius: np.ndarray  # (rows, cols)
    angle: np.ndarray  # (rows, cols), radians in [-pi, pi]
    disc: np.ndarray  # (rows, cols) bool, radius <= 1

    @property
    def shape(self) -> tuple[int, int]:
        return self.radius.shape  # type: ignore[return-value]


def _read_only(array: np.ndarray) -> np.ndarray:
    array.setflags(write=False)
    return array


def normalised_coordinates(n: int) -> np.ndarray:
    return (np.arange(n, dtype=np.float32) + 0.5) / n * 2 - 1


@lru_cache(maxsize=512)
def die_geometry(rows: int, cols: int) -> DieGeometry:
    y = normalised_coordinates(rows)[:, None]
    x = normalised_coordinates(cols)[None, :]
    radius = np.sqrt(y * y + x * x)
    angle = np.arctan2(y, x).astype(np.float32)
    return DieGeometry(*(_read_only(a) for a in (y, x, radius, angle, radius <= 1.0)))


@lru_cache(maxsize=512)
def interpolation_matrix(n: int, cells: int) -> np.ndarray:
    """(n, cells) weights that linearly interpolate a `cells`-point profile onto n dies."""
    position = (np.arange(n) + 0.5) / n * (cells - 1)
    left = np.minimum(position.astype(int), cells - 2)
    weight = (position - left).astype(np.float32)
    matrix = np.zeros((n, cells), dtype=np.float32)
    matrix[np.arange(n), left] = 1 - weight
    matrix[np.arange(n), left + 1] = weight
    return _read_only(matrix)


def smooth_noise(shape: tuple[int, int], cells: int, noise: np.ndarray) -> np.ndarray:
    """Upsample (..., cells, cells) noise to (..., rows, cols) with the cached interpolation matrices."""
    return interpolation_matrix(shape[0], cells) @ noise @ interpolation_matrix(shape[1], cells).T


def die_index(coordinate: np.ndarray, n: int) -> np.ndarray:
    """Nearest die index along an axis of n dies for normalised coordinates (inverse of the above)."""
    return np.rint((coordinate + 1) * (n / 2) - 0.5).astype(np.intp)


def die_span(lo: float, hi: float, n: int) -> tuple[int, int]:
    """Slice bounds (clipped to the grid) of the dies whose centres may lie in [lo, hi]."""
    start = math.floor((lo + 1) * (n / 2) - 0.5)
    stop = math.ceil((hi + 1) * (n / 2) - 0.5) + 1
    return max(start, 0), min(stop, n)


def angular_distance(angle: np.ndarray, centre: float) -> np.ndarray:
    return np.abs(np.remainder(angle - centre + math.pi, 2 * math.pi) - math.pi)


# --- per-lot draws ---------------------------------------------------------------------------


def uniform(draw: random.Random, span: Range) -> float:
    return draw.uniform(span.lo, span.hi)


def clipped(value: float, lo: float, hi: float) -> float:
    return min(max(value, lo), hi)


def grid_side(value: float, size: SizeParams) -> int:
    return int(clipped(round(value), size.side_min, size.side_max))


def draw_shape(size: SizeParams, draw: random.Random) -> tuple[int, int]:
    longer = size.side_median * math.exp(draw.gauss(0.0, size.side_log_sigma))
    aspect = clipped(draw.gauss(size.aspect_mean, size.aspect_sigma), size.aspect_min, size.aspect_max)
    rows, cols = (longer, longer / aspect) if aspect >= 1 else (longer * aspect, longer)
    return grid_side(rows, size), grid_side(cols, size)


def on_wafer_region(geometry: DieGeometry, cut: EdgeCutParams, draw: random.Random) -> np.ndarray:
    """The inscribed disc, less a flat or a notch on one of the four sides (or neither)."""
    on = geometry.disc.copy()
    kind = draw.random()
    if kind >= cut.p_flat + cut.p_notch:
        return on
    side = draw.randrange(4)
    along = (geometry.y, -geometry.y, geometry.x, -geometry.x)[side]
    min_reach = cut.cut_min_dies * 2 / geometry.shape[0 if side < 2 else 1]
    if kind < cut.p_flat:
        on &= along <= 1 - max(uniform(draw, cut.flat_depth), min_reach)
        return on
    radius = max(uniform(draw, cut.notch_radius), min_reach)
    across = (geometry.x, geometry.x, geometry.y, geometry.y)[side]
    on &= (along - 1) ** 2 + across**2 > radius**2
    return on


@lru_cache(maxsize=512)
def edge_profile(shape: tuple[int, int], decay: float) -> np.ndarray:
    """exp(-(1 - radius) / decay): 1 at the edge, falling off inwards."""
    return _read_only(np.exp((die_geometry(*shape).radius - 1) / decay))


def background_fail_probability(
    geometry: DieGeometry, background: BackgroundParams, n_wafers: int, rng: np.random.Generator
) -> np.ndarray:
    """(n_wafers, rows, cols) random-fail probability: log-normal base rate x clustering x edge effect."""
    base = np.minimum(
        background.fail_median * np.exp(background.fail_log_sigma * rng.standard_normal(n_wafers)),
        background.fail_max,
    ).astype(np.float32)
    boost = rng.uniform(background.edge_boost.lo, background.edge_boost.hi, n_wafers).astype(np.float32)
    clustered = rng.random(n_wafers) < background.p_clustered
    cells = background.cluster_cells
    noise = rng.standard_normal((n_wafers, cells, cells), dtype=np.float32)
    strength = np.where(clustered, background.cluster_strength, 0.0).astype(np.float32)
    cluster = np.exp(strength[:, None, None] * smooth_noise(geometry.shape, cells, noise))
    cluster /= cluster.mean(axis=(1, 2), keepdims=True)
    edge = edge_profile(geometry.shape, background.edge_decay)
    return cluster * (base[:, None, None] * (1 + boost[:, None, None] * edge))


# --- pattern regions -------------------------------------------------------------------------


def ring_region(geometry: DieGeometry, ring: RingParams, draw: random.Random) -> np.ndarray:
    if draw.random() < ring.p_donut:
        centre = uniform(draw, ring.donut_radius)
        region = np.abs(geometry.radius - centre) <= uniform(draw, ring.donut_width) / 2
    else:
        region = geometry.radius >= 1 - uniform(draw, ring.edge_width)
    if draw.random() < ring.p_partial:
        half_span = math.radians(uniform(draw, ring.arc_span_deg)) / 2
        region &= angular_distance(geometry.angle, draw.uniform(-math.pi, math.pi)) <= half_span
    return region


ScratchSegment = tuple[np.ndarray, np.ndarray, bool]


def scratch_points(scratch: ScratchParams, step: float, draw: random.Random) -> list[ScratchSegment]:
    """Sampled (y, x) points of each polyline segment, and whether the segment runs mostly along rows."""
    segments = draw.randint(int(scratch.segments.lo), int(scratch.segments.hi))
    piece = uniform(draw, scratch.length) / segments
    start_radius = scratch.start_radius * math.sqrt(draw.random())
    start_angle = draw.uniform(-math.pi, math.pi)
    y, x = start_radius * math.sin(start_angle), start_radius * math.cos(start_angle)
    heading = draw.uniform(-math.pi, math.pi)
    points = []
    t = np.linspace(0.0, piece, max(2, math.ceil(piece / step) + 1))
    for k in range(segments):
        if k:
            heading += math.radians(uniform(draw, scratch.turn_deg))
        dy, dx = math.sin(heading), math.cos(heading)
        points.append((y + t * dy, x + t * dx, abs(dx) >= abs(dy)))
        y, x = y + piece * dy, x + piece * dx
    return points


def scratch_region(geometry: DieGeometry, scratch: ScratchParams, draw: random.Random) -> np.ndarray:
    rows, cols = geometry.shape
    step = scratch.step_dies * 2 / max(rows, cols)
    wide = draw.random() < scratch.p_wide
    region = np.zeros((rows, cols), dtype=bool)
    for ys, xs, along_rows in scratch_points(scratch, step, draw):
        i, j = die_index(ys, rows), die_index(xs, cols)
        if wide:  # the second die goes across the line: below a flat segment, beside a steep one
            i, j = np.concatenate([i, i + along_rows]), np.concatenate([j, j + (not along_rows)])
        inside = (i >= 0) & (i < rows) & (j >= 0) & (j < cols)
        region[i[inside], j[inside]] = True
    return region


def local_zone_region(geometry: DieGeometry, zone: LocalZoneParams, draw: random.Random) -> np.ndarray:
    """A blob with outline r(phi) = R (1 + sum_k a_k cos(k phi + psi_k)), computed in its bounding box."""
    if draw.random() < zone.p_edge:
        centre_radius = uniform(draw, zone.edge_centre_radius)
    else:
        centre_radius = zone.interior_radius * math.sqrt(draw.random())
    centre_angle = draw.uniform(-math.pi, math.pi)
    cy, cx = centre_radius * math.sin(centre_angle), centre_radius * math.cos(centre_angle)
    radius, irregularity = uniform(draw, zone.radius), uniform(draw, zone.irregularity)
    amplitudes = [draw.random() for _ in range(zone.harmonics)]
    scale = irregularity / sum(amplitudes)
    wobble = [(k + 2, a * scale, draw.uniform(-math.pi, math.pi)) for k, a in enumerate(amplitudes)]

    rows, cols = geometry.shape
    reach = radius * (1 + irregularity)
    r0, r1 = die_span(cy - reach, cy + reach, rows)
    c0, c1 = die_span(cx - reach, cx + reach, cols)
    region = np.zeros((rows, cols), dtype=bool)
    if r0 >= r1 or c0 >= c1:
        return region
    dy, dx = geometry.y[r0:r1] - cy, geometry.x[:, c0:c1] - cx
    phi = np.arctan2(dy, dx)
    outline = radius * (1 + sum(a * np.cos(k * phi + psi) for k, a, psi in wobble))
    region[r0:r1, c0:c1] = dy * dy + dx * dx <= outline * outline
    return region


def circle_region(geometry: DieGeometry, circle: CircleParams, draw: random.Random) -> np.ndarray:
    cy, cx = draw.gauss(0.0, circle.centre_jitter), draw.gauss(0.0, circle.centre_jitter)
    radius = uniform(draw, circle.radius)
    return (geometry.y - cy) ** 2 + (geometry.x - cx) ** 2 <= radius * radius


# kind -> f(geometry, that kind's params, draw) -> bool region of the die grid
REGION_DRAWERS: dict[str, Callable[..., np.ndarray]] = {
    "ring": ring_region,
    "scratch": scratch_region,
    "local_zone": local_zone_region,
    "circle": circle_region,
}


# --- wafers and lots -------------------------------------------------------------------------


def draw_pattern_kinds(params: SynthParams, draw: random.Random) -> list[str]:
    patterns = params.patterns
    count = draw.choices(range(len(patterns.count_probs)), weights=patterns.count_probs)[0]
    if count == 0:
        return []
    weights = [patterns.kind_weights.get(kind, 0.0) for kind in PATTERN_KINDS]
    return draw.choices(PATTERN_KINDS, weights=weights, k=count)


def add_patterns(
    params: SynthParams,
    geometry: DieGeometry,
    on: np.ndarray,
    u: np.ndarray,
    fails: np.ndarray,
    mask: np.ndarray,
    draw: random.Random,
) -> None:
    """Draw 0..3 patterns onto one wafer: their failing dies join `fails` and carry their class in `mask`
    (where patterns overlap, the later one's class wins)."""
    for kind in draw_pattern_kinds(params, draw):
        kind_params = getattr(params.patterns, kind)
        region = REGION_DRAWERS[kind](geometry, kind_params, draw)
        produced = region & on & (u < uniform(draw, kind_params.density))
        fails |= produced
        np.copyto(mask, CLASS_ID[kind], where=produced)


def lot_id(params: SynthParams, seed: int, lot_index: int) -> str:
    return f"{params.lot_prefix}{seed}-{lot_index:05d}"


def generate_lot(
    params: SynthParams,
    seed: int,
    lot_index: int,
    count: int | None = None,
    shape: tuple[int, int] | None = None,
) -> list[Wafer]:
    """The first `count` wafers of lot `lot_index`; a lot depends only on (params, seed, lot_index, shape).

    Lot-wide arrays are always drawn for the full lot, so a shorter lot is a prefix of the full one.
    """
    size = params.wafers_per_lot
    count = size if count is None else min(count, size)
    rng = np.random.default_rng([seed, lot_index])
    draw = random.Random(int(rng.integers(2**63)))
    rows, cols = shape or params.size.fixed_shape or draw_shape(params.size, draw)
    geometry = die_geometry(rows, cols)
    on = on_wafer_region(geometry, params.edge_cut, draw)
    u = rng.random((size, rows, cols), dtype=np.float32)
    fails = (u < background_fail_probability(geometry, params.background, size, rng)) & on
    masks = np.zeros((size, rows, cols), dtype=np.uint8)
    for i in range(count):
        add_patterns(params, geometry, on, u[i], fails[i], masks[i], draw)
    maps = on.view(np.uint8) + fails.view(np.uint8)
    name = lot_id(params, seed, lot_index)
    source = f"synthetic:seed={seed}"
    # Built directly rather than through validate_wafer (40 us a wafer): the arrays are valid by construction.
    return [Wafer(name, f"{i + 1:02d}", maps[i], masks[i], None, source) for i in range(count)]


def generate(
    params: SynthParams, seed: int, n: int | None = None, *, shape: tuple[int, int] | None = None
) -> Iterator[Wafer]:
    """`n` (default params.n_wafers) labelled synthetic wafers in lots of params.wafers_per_lot.

    Deterministic for a seed, and generate(p, s, n) is a prefix of generate(p, s, m) for n <= m.
    `shape` (rows, cols) fixes every lot's grid, overriding params.size.
    """
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    total = params.n_wafers if n is None else n
    for lot_index, start in enumerate(range(0, total, params.wafers_per_lot)):
        yield from generate_lot(params, seed, lot_index, total - start, shape)


# --- calibration against real wafers ---------------------------------------------------------


WaferLike = Wafer | np.ndarray


def wafer_stats(wafer_map: np.ndarray) -> dict[str, float]:
    """rows, cols, fail_fraction (fails / on-wafer dies) and edge_fail_fraction: the share of the wafer's
    fails at normalised radius >= EDGE_STAT_RADIUS (generator geometry); NaN when the wafer has no fail."""
    rows, cols = wafer_map.shape
    on = wafer_map != OFF_WAFER
    failing = wafer_map == FAIL
    n_fail = int(np.count_nonzero(failing))
    n_edge = int(np.count_nonzero(failing & (die_geometry(rows, cols).radius >= EDGE_STAT_RADIUS)))
    return {
        "rows": float(rows),
        "cols": float(cols),
        "fail_fraction": n_fail / max(int(np.count_nonzero(on)), 1),
        "edge_fail_fraction": n_edge / n_fail if n_fail else math.nan,
    }


def stats_table(wafers: Iterable[WaferLike]) -> pd.DataFrame:
    """One row of wafer_stats per wafer (a Wafer or a bare map)."""
    rows = [wafer_stats(w.map if isinstance(w, Wafer) else np.asarray(w)) for w in wafers]
    return pd.DataFrame(rows, columns=list(STAT_NAMES))


def _as_stats(wafers: Iterable[WaferLike] | pd.DataFrame) -> pd.DataFrame:
    return wafers if isinstance(wafers, pd.DataFrame) else stats_table(wafers)


def ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs."""
    a, b = np.sort(a), np.sort(b)
    points = np.concatenate([a, b])
    cdf_a = np.searchsorted(a, points, side="right") / a.size
    cdf_b = np.searchsorted(b, points, side="right") / b.size
    return float(np.max(np.abs(cdf_a - cdf_b)))


def _summary(values: np.ndarray, prefix: str) -> dict[str, float]:
    p10, p50, p90 = np.percentile(values, [10, 50, 90]) if values.size else (math.nan,) * 3
    mean = float(values.mean()) if values.size else math.nan
    return {f"{prefix}_p10": p10, f"{prefix}_p50": p50, f"{prefix}_p90": p90, f"{prefix}_mean": mean}


def compare_real(
    real_wafers: Iterable[WaferLike] | pd.DataFrame, synth_wafers: Iterable[WaferLike] | pd.DataFrame
) -> pd.DataFrame:
    """Per statistic (index): real and synthetic p10/p50/p90/mean, the KS statistic, and sample sizes.

    Either side may be Wafers, bare maps, or a stats_table frame. Wafers without fails are left out of
    edge_fail_fraction.
    """
    real, synth = _as_stats(real_wafers), _as_stats(synth_wafers)
    records = []
    for name in STAT_NAMES:
        r = real[name].dropna().to_numpy(float)
        s = synth[name].dropna().to_numpy(float)
        ks = ks_statistic(r, s) if r.size and s.size else math.nan
        records.append({"statistic": name, **_summary(r, "real"), **_summary(s, "synth"), "ks": ks,
                        "n_real": r.size, "n_synth": s.size})
    return pd.DataFrame.from_records(records).set_index("statistic")


def shared_bins(values: np.ndarray, n_bins: int = 40) -> np.ndarray:
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 1.0)
    if hi <= lo:  # one value only: a unit-wide bin around it
        lo, hi = lo - 0.5, hi + 0.5
    return np.linspace(lo, hi, n_bins + 1)


def plot_comparison(
    real_wafers: Iterable[WaferLike] | pd.DataFrame,
    synth_wafers: Iterable[WaferLike] | pd.DataFrame,
    path: Path | str,
) -> Path:
    """Save overlaid real/synthetic histograms, one panel per statistic, as a PNG; return its path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    real, synth = _as_stats(real_wafers), _as_stats(synth_wafers)
    figure = Figure(figsize=(10, 7), layout="constrained")
    FigureCanvasAgg(figure)
    for axes, name in zip(figure.subplots(2, 2).flat, STAT_NAMES):
        r, s = real[name].dropna().to_numpy(float), synth[name].dropna().to_numpy(float)
        bins = shared_bins(np.concatenate([r, s]))
        axes.hist(r, bins=bins, density=True, alpha=0.55, label=f"real (n={r.size})")
        axes.hist(s, bins=bins, density=True, alpha=0.55, label=f"synthetic (n={s.size})")
        ks = ks_statistic(r, s) if r.size and s.size else math.nan
        axes.set_title(f"{name}  (KS {ks:.3f})")
        axes.legend(fontsize="small")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)
    return path
