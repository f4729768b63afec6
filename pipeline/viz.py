"""Drawing wafer maps: one palette and one die renderer for previews, evaluation overlays and reports."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402


from pipeline.params import PreviewParams  # noqa: E402
from pipeline.wafer import CLASS_NAMES, DIE_COLUMNS, FAIL, PASS  # noqa: E402

OFF_COLOUR = "#ffffff"
PASS_COLOUR = "#d9dde3"
FAIL_COLOUR = "#5b6270"
# Colour-blind-safe (Okabe-Ito) colours for ring, scratch, local_zone, circle.
CLASS_COLOURS = {1: "#d55e00", 2: "#0072b2", 3: "#e69f00", 4: "#cc79a7"}


def _rgb(hex_colour: str) -> np.ndarray:
    return np.array([int(hex_colour[i : i + 2], 16) for i in (1, 3, 5)], dtype=np.uint8)


# One palette for every drawing: off-wafer (also the gutter between dies), pass, fail, then the classes.
PALETTE = np.stack([_rgb(c) for c in (OFF_COLOUR, PASS_COLOUR, FAIL_COLOUR, *CLASS_COLOURS.values())])
CLASS_INDEX_OFFSET = 2  # class c is palette index 2 + c


def _colour_table() -> np.ndarray:
    """Palette index by (die state, mask value): off-wafer white whatever the mask, pass light grey, fail dark
    grey, and a pattern class's colour on a pass or fail die."""
    table = np.zeros((3, 256), dtype=np.uint8)
    table[PASS], table[FAIL] = 1, 2
    for class_id in CLASS_COLOURS:
        table[PASS, class_id] = table[FAIL, class_id] = class_id + CLASS_INDEX_OFFSET
    return table


COLOUR_TABLE = _colour_table()


def die_colours(wafer_map: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Palette indices (H, W) of the dies: off-wafer white, pass light grey, fail dark grey, pattern classes
    coloured (a class on an off-wafer die is not drawn)."""
    return COLOUR_TABLE[wafer_map, 0 if mask is None else mask]


def colour_dies(wafer_map: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """RGB image (H, W, 3) of die_colours."""
    return PALETTE[die_colours(wafer_map, mask)]


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def palette_png(indices: np.ndarray, level: int = 1) -> bytes:
    """A PNG (8-bit palette, PALETTE) of palette indices (H, W), written directly: PIL's per-image bookkeeping
    took longer than zlib itself on a wafer-sized image."""
    height, width = indices.shape
    rows = np.zeros((height, width + 1), dtype=np.uint8)  # each scanline starts with filter type 0 (none)
    rows[:, 1:] = indices
    return b"".join([b"\x89PNG\r\n\x1a\n",
                     _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 3, 0, 0, 0)),
                     _png_chunk(b"PLTE", PALETTE.tobytes()),
                     _png_chunk(b"IDAT", zlib.compress(rows.tobytes(), level)),
                     _png_chunk(b"IEND", b"")])


def legend_handles() -> list[Patch]:
    handles = [Patch(facecolor=PASS_COLOUR, edgecolor="#999", label="pass"),
               Patch(facecolor=FAIL_COLOUR, label="fail (background)")]
    handles += [Patch(facecolor=CLASS_COLOURS[c], label=CLASS_NAMES[c]) for c in CLASS_COLOURS]
    return handles


def save_wafer_grid(
    panels: Sequence[Sequence[tuple[str, np.ndarray]]],
    path: Path,
    title: str | None = None,
    panel_inches: float = 2.2,
) -> Path:
    """Save rows of (caption, RGB image) panels as one PNG with the class legend below."""
    n_rows = len(panels)
    n_cols = max(len(row) for row in panels)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(panel_inches * n_cols, panel_inches * n_rows + 0.8),
                             squeeze=False)
    for axis_row, row in zip(axes, panels):
        for axis in axis_row:
            axis.axis("off")
        for axis, (caption, image) in zip(axis_row, row):
            axis.imshow(image, interpolation="nearest")
            axis.set_title(caption, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.legend(handles=legend_handles(), loc="lower center", ncol=6, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 0.97 if title else 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def preview_dataset(dataset, params: PreviewParams) -> Path:
    """A few wafers of a dataset next to their masks, patterned wafers first."""
    index = dataset.index
    has_mask = index["has_mask"].to_numpy()
    patterned = has_mask & (index[DIE_COLUMNS[1:]].to_numpy() > 0).any(axis=1)
    positions = [*np.flatnonzero(patterned), *np.flatnonzero(~patterned)][: params.n_wafers]
    panels = []
    for position in positions:
        wafer = dataset.wafer(int(position))
        name = f"{wafer.lot_id}/{wafer.wafer_id} {wafer.shape[0]}x{wafer.shape[1]}"
        row = [(name, colour_dies(wafer.map))]
        if wafer.mask is not None:
            present = [CLASS_NAMES[c] for c in np.unique(wafer.mask) if c]
            row.append((", ".join(present) or "no pattern", colour_dies(wafer.map, wafer.mask)))
        panels.append(row)
    pairs = [panels[i : i + 2] for i in range(0, len(panels), 2)]
    return save_wafer_grid([sum(pair, []) for pair in pairs], params.path,
                           title=f"{dataset.root}: map | mask")
