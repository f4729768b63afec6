"""A classical, rule-based segmenter: what a fab engineer would script without machine learning.

Every rule compares a local fail rate with the rate random fails would give there: the wafer's interior
fail rate, raised towards the edge by the usual edge effect. Three detectors run on the fail map:
- rings: dies binned in polar cells (radial band x 10-degree sector); a band whose over-dense sectors
  form one long arc (or a full annulus) is a ring, edge band or donut;
- blobs: the local fail density in a box around each die; over-dense regions become connected
  components, and geometry names each: elongated is a scratch, compact over the centre is a circle,
  anything else a local zone;
- lines: a bank of rotated line filters finds thin straight runs of fails; long elongated runs are
  scratches, drawn over whatever lies beneath.
Only failing dies ever get a defect class. This is the baseline benchmarks/peers.py measures the learned
models against; production uses the FCN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import ndimage
from skimage import draw, measure

from pipeline.wafer import CLASS_NAMES, FAIL, OFF_WAFER

RING, SCRATCH, LOCAL_ZONE, CIRCLE = (CLASS_NAMES.index(n) for n in ("ring", "scratch", "local_zone", "circle"))
SECTORS = 36  # polar cells are 10 degrees wide


@dataclass(frozen=True)
class Rules:
    """Thresholds of the classical segmenter. Radii are fractions of the wafer radius."""

    interior_radius: float = 0.7  # the random-fail rate is the median local density inside this radius
    # The process's edge effect: random fails at the very edge are (1 + edge_boost) x the interior rate,
    # falling off inwards as exp(-(1 - radius) / edge_decay).
    edge_boost: float = 4.0
    edge_decay: float = 0.055
    dense_margin: float = 0.15  # over-dense: local fail rate > expected + margin and > expected x ratio
    dense_ratio: float = 2.0
    density_window: float = 0.12  # side of the blob density box, as a fraction of the longer grid side
    ring_band_dies: float = 1.5  # radial width of a polar band, in dies
    ring_min_arc: float = 0.25  # an over-dense arc must span this share of the circle to be a ring
    ring_min_radius: float = 0.3  # rings (edge or donut) lie outside this radius ...
    ring_min_hole: float = 0.15  # ... and, inside the edge band, leave this much radius free inside them
    edge_band: float = 0.75  # where edge rings start; inside it an annulus is a donut
    min_blob_dies: int = 5  # fewer failing dies than this in a component: random fails, background
    circle_max_offset: float = 0.3  # a circle's centroid lies this close to the wafer centre ...
    circle_min_roundness: float = 0.5  # ... with minor / major axis at least this
    line_length: int = 7  # dies along each line filter
    line_angles: int = 12  # orientations in [0, 180) degrees
    line_min_density: float = 0.7  # share of failing dies along the best line
    line_end_density: float = 0.5  # enough to extend a found scratch: at its ends a filter sees half a line
    line_min_contrast: float = 0.35  # best-line density minus the density across it
    scratch_min_length: float = 8.0  # major axis of a scratch, in dies
    scratch_min_elongation: float = 2.5  # major / minor axis of a scratch
    ring_grow_dies: int = 1  # a ring takes in failing neighbours this many dies out (polar bands cut its rim)
    scratch_grow_dies: int = 3  # a scratch extends this many dies through line ends (line_end_density)


DEFAULT_RULES = Rules()


@lru_cache(maxsize=64)
def line_kernels(length: int, angles: int) -> tuple[np.ndarray, ...]:
    """Normalised line kernels through the centre of a length x length box, one per orientation."""
    half = length // 2
    kernels = []
    for k in range(angles):
        theta = math.pi * k / angles
        dy, dx = round(half * math.sin(theta)), round(half * math.cos(theta))
        kernel = np.zeros((2 * half + 1, 2 * half + 1), dtype=np.float32)
        kernel[draw.line(half - dy, half - dx, half + dy, half + dx)] = 1.0
        kernels.append(kernel / kernel.sum())
    return tuple(kernels)


@lru_cache(maxsize=256)
def polar_grid(rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """Radius (1 at the edge of the inscribed ellipse, as pipeline.synth draws wafers) and sector of each die."""
    y = ((np.arange(rows) + 0.5) / rows * 2 - 1)[:, None]
    x = ((np.arange(cols) + 0.5) / cols * 2 - 1)[None, :]
    sector = np.floor((np.arctan2(y, x) + math.pi) / (2 * math.pi) * SECTORS).astype(np.intp) % SECTORS
    return np.sqrt(y * y + x * x), sector


def expected_rate(fail: np.ndarray, on: np.ndarray, radius: np.ndarray, rules: Rules) -> np.ndarray:
    """Random-fail probability of every die: the interior rate, raised towards the edge."""
    window = max(3, round(rules.density_window * max(fail.shape)) | 1)
    interior = on & (radius < rules.interior_radius)
    density = local_density(fail, on, window)
    rate = float(np.median(density[interior])) if interior.any() else float(fail[on].mean())
    return rate * (1 + rules.edge_boost * np.exp((np.minimum(radius, 1.0) - 1) / rules.edge_decay))


def over_dense(rate: np.ndarray, expected: np.ndarray, rules: Rules) -> np.ndarray:
    return rate > np.maximum(expected + rules.dense_margin, expected * rules.dense_ratio)


def local_density(fail: np.ndarray, on: np.ndarray, window: int) -> np.ndarray:
    """Share of failing dies among the on-wafer dies of a window x window box around each die."""
    fails = ndimage.uniform_filter(fail.astype(np.float32), window, mode="constant")
    dies = ndimage.uniform_filter(on.astype(np.float32), window, mode="constant")
    return np.where(on, fails / np.maximum(dies, 1e-6), 0.0)


def longest_circular_run(flags: np.ndarray) -> tuple[int, int]:
    """(start, length) of the longest run of True in a circular 1-D array; length == size when all True."""
    if flags.all():
        return 0, len(flags)
    best, start = (0, 0), None
    doubled = np.concatenate([flags, flags])
    for i, flag in enumerate(doubled):
        if flag and start is None:
            start = i
        if (not flag or i == len(doubled) - 1) and start is not None:
            end = i if not flag else i + 1
            if end - start > best[1] and start < len(flags):
                best = (start, min(end - start, len(flags)))
            start = None
    return best


def ring_dies(fail: np.ndarray, on: np.ndarray, radius: np.ndarray, sector: np.ndarray, expected: np.ndarray,
              blob_dense: np.ndarray, rules: Rules) -> np.ndarray:
    """Failing dies of polar bands whose over-dense sectors form one arc of at least ring_min_arc
    (`blob_dense`: dies over-dense in their box, to tell a donut's hole from a filled disc)."""
    half_side = max(fail.shape) / 2
    band = np.where(on, (radius * half_side / rules.ring_band_dies).astype(np.intp), -1)
    n_bands = int(band.max()) + 1
    cell = np.where(on, band * SECTORS + sector, 0)

    def per_arc(weights: np.ndarray) -> np.ndarray:
        """Sum over each polar cell and its two neighbouring sectors: a 30-degree arc of one band."""
        grid = np.bincount(cell[on], weights[on], n_bands * SECTORS).reshape(n_bands, SECTORS)
        return grid + np.roll(grid, 1, axis=1) + np.roll(grid, -1, axis=1)

    dies, fails, expect = per_arc(np.ones(fail.shape)), per_arc(fail.astype(float)), per_arc(expected)
    with np.errstate(invalid="ignore", divide="ignore"):
        dense = (dies >= 3) & over_dense(fails / dies, expect / dies, rules)
    band_radius = (np.arange(n_bands) + 0.5) * rules.ring_band_dies / half_side
    ring = np.zeros(fail.shape, dtype=bool)
    for b in np.flatnonzero(band_radius >= rules.ring_min_radius):
        start, length = longest_circular_run(dense[b])
        if length < rules.ring_min_arc * SECTORS:
            continue
        arc = np.arange(start, start + length) % SECTORS
        # A donut has a hole: over-dense cells right inside it along the arc make it a filled disc instead.
        inside = band_radius[b] - radius
        hole = on & (inside > rules.ring_min_hole) & (inside <= 2 * rules.ring_min_hole) & np.isin(sector, arc)
        if band_radius[b] < rules.edge_band and hole.any() and blob_dense[hole].mean() > 0.5:
            continue
        ring |= (band == b) & np.isin(sector, arc)
    return ring & fail


def blob_class(region, shape: tuple[int, int], rules: Rules) -> int:
    """Scratch, circle or local zone for one over-dense component, from its shape and where it lies."""
    major, minor = region.axis_major_length, max(region.axis_minor_length, 1.0)
    if major >= rules.scratch_min_length and major >= rules.scratch_min_elongation * minor:
        return SCRATCH
    cy, cx = region.centroid
    offset = math.hypot((cy + 0.5) / shape[0] * 2 - 1, (cx + 0.5) / shape[1] * 2 - 1)
    if offset <= rules.circle_max_offset and minor / max(major, 1e-6) >= rules.circle_min_roundness:
        return CIRCLE
    return LOCAL_ZONE


def line_response(fail: np.ndarray, rules: Rules) -> tuple[np.ndarray, np.ndarray]:
    """Share of failing dies along the best-filled line through each die, and across that line."""
    responses = np.stack([ndimage.correlate(fail.astype(np.float32), k, mode="constant")
                          for k in line_kernels(rules.line_length, rules.line_angles)])
    best = responses.argmax(axis=0)
    across = np.take_along_axis(responses, ((best + rules.line_angles // 2) % rules.line_angles)[None], 0)[0]
    return responses.max(axis=0), across


def segment(wafer_map: np.ndarray, rules: Rules = DEFAULT_RULES) -> np.ndarray:
    """uint8 mask of class ids, the map's shape; passing and off-wafer dies are 0 (background)."""
    wafer_map = np.asarray(wafer_map)
    on, fail = wafer_map != OFF_WAFER, wafer_map == FAIL
    mask = np.zeros(wafer_map.shape, dtype=np.uint8)
    if not fail.any():
        return mask
    radius, sector = polar_grid(*wafer_map.shape)
    expected = expected_rate(fail, on, radius, rules)

    window = max(3, round(rules.density_window * max(fail.shape)) | 1)
    ring = ring_dies(fail, on, radius, sector, expected,
                     on & over_dense(local_density(fail, on, window), expected, rules), rules)
    ring = grow(ring, fail, rules.ring_grow_dies)
    mask[ring] = RING

    rest = fail & ~ring
    dense = on & over_dense(local_density(rest, on, window), expected, rules)
    for region in measure.regionprops(measure.label(dense, connectivity=2)):
        rows, cols = region.coords[:, 0], region.coords[:, 1]
        failing = rest[rows, cols]
        if failing.sum() >= rules.min_blob_dies:
            mask[rows[failing], cols[failing]] = blob_class(region, wafer_map.shape, rules)

    # A scratch is drawn across whatever lies beneath it, so line dies override blob classes.
    along, across = line_response(rest, rules)
    thin = rest & (along - across >= rules.line_min_contrast)
    lines = thin & (along >= rules.line_min_density)
    runs = measure.label(ndimage.binary_dilation(lines, np.ones((3, 3), bool)), connectivity=2) * lines
    scratch = np.zeros_like(fail)
    for region in measure.regionprops(runs):  # line dies grouped across one-die gaps
        major, minor = region.axis_major_length, max(region.axis_minor_length, 1.0)
        if major >= rules.scratch_min_length and major >= rules.scratch_min_elongation * minor:
            scratch[region.coords[:, 0], region.coords[:, 1]] = True
    ends = thin & (along >= rules.line_end_density) & ((mask == 0) | scratch)
    mask[grow(scratch, ends, rules.scratch_grow_dies)] = SCRATCH
    return mask


def grow(seed: np.ndarray, allowed: np.ndarray, steps: int) -> np.ndarray:
    """`seed` extended by up to `steps` dies (8-connected) through `allowed` dies."""
    if steps <= 0 or not seed.any():
        return seed
    return ndimage.binary_dilation(seed, np.ones((3, 3), bool), iterations=steps, mask=allowed) | seed
