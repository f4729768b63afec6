"""Per-lot reports and the cross-lot index: masks, wafer tables, a lot summary and a self-contained page.

Layout of one lot's report, `OUT/<lot_id>/` (CONTRACT.md, "Report outputs"):
    masks/<wafer_id>.npy  predicted mask, uint8, the map's shape, off-wafer dies 0
    wafers.csv/.parquet   one row per wafer: WAFER_COLUMNS
    summary.csv           one row per defect class: SUMMARY_COLUMNS
    quarantine.csv        one row per input that could not be processed: QUARANTINE_COLUMNS
    report.html           self-contained page (images inlined as base64 PNG, inline CSS and JS)
    manifest.json         written last: model version, counts, file list; it marks the report complete

A lot is built in `OUT/.tmp-<lot_id>-xxxx/` and renamed into place, so `OUT/<lot_id>/` is either the
old complete report or the new complete one. A process killed mid-write can leave a dot-prefixed temp
directory behind; nothing here mistakes it for a report, and the next run that claims the lot deletes it.
"""

from __future__ import annotations

import base64
import csv
import functools
import hashlib
import html
import io
import json
import logging
import os
import shutil
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from urllib.parse import quote

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from scipy.ndimage import label

from pipeline import viz
from pipeline.atomic import atomic_file, recover_directory, replace_directory, staging_directory
from pipeline.io import Rejected
from pipeline.params import InferParams, ReportParams
from pipeline.patterns import patterns_of_counts
from pipeline.wafer import (CLASS_NAMES, DEFECT_CLASSES, DIE_COLUMNS, INDEX_FILE, OFF_WAFER, Wafer, check_id,
                            class_die_counts, wafer_summary)

log = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
REPORT_FILE = "report.html"
WAFERS_CSV = "wafers.csv"
MASK_DIR = "masks"
PNG_COMPRESS_LEVEL = 1  # zlib level of the wafer images: level 6 took 2.5x longer for 20 % smaller
FILE_THREADS = 32  # files written and fsynced at once: the more, the fewer journal commits
EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)  # a region's dies touch by a side or a corner
DIE_GRID_ID = "die-grid"  # the SVG pattern every wafer image of a page draws its gutter with
MANIFEST_SCHEMA = 2  # 2: files with their sizes and hashes, and the fingerprint of the lot's inputs
NO_PATTERN = "none"

DEFECT_NAMES = [CLASS_NAMES[c] for c in DEFECT_CLASSES]
SHAPE_COLUMNS = [f"{stat}_{name}" for name in DEFECT_NAMES for stat in ("regions", "largest")]
WAFER_COLUMNS = ["lot_id", "wafer_id", "rows", "cols", "n_dies", "n_fail", *DIE_COLUMNS, "patterns", "dominant_class",
                 *SHAPE_COLUMNS, "model_version"]
WAFER_TEXT_COLUMNS = ("lot_id", "wafer_id", "patterns", "dominant_class", "model_version")
# wafers.parquet: the text columns as pandas writes its strings (large_string), every count int64.
WAFER_SCHEMA = pa.schema([(c, pa.large_string() if c in WAFER_TEXT_COLUMNS else pa.int64()) for c in WAFER_COLUMNS])
SUMMARY_COLUMNS = ["lot_id", "class", "wafers_with_pattern", "total_dies", "mean_dies_per_affected_wafer"]
QUARANTINE_COLUMNS = ["lot_id", "wafer_id", "source", "reason"]

# SVG bar chart: width, height, top and bottom margins, bar width, gap between bars (pixels).
BAR_CHART_SIZE = (420, 170, 18, 22, 80, 20)
# mkdtemp/mkstemp create owner-only entries; published reports get the usual permissions.
DIR_MODE, FILE_MODE = 0o755, 0o644


@dataclass(frozen=True)
class LotCounts:
    """Wafers read = wafers reported + inputs quarantined, by construction."""

    reported: int
    quarantined: int

    @property
    def read(self) -> int:
        return self.reported + self.quarantined

    def as_dict(self) -> dict[str, int]:
        return {"read": self.read, "reported": self.reported, "quarantined": self.quarantined}


# --- tables ----------------------------------------------------------------------------------


def clean_mask(prediction: np.ndarray, wafer: Wafer) -> np.ndarray:
    """The stored mask: uint8, the map's shape, class ids 0..4, off-wafer dies forced to 0."""
    prediction = np.asarray(prediction)
    if prediction.shape != wafer.shape:
        raise ValueError(f"wafer {wafer.lot_id}/{wafer.wafer_id}: prediction shape {prediction.shape} "
                         f"differs from map shape {wafer.shape}")
    if not np.issubdtype(prediction.dtype, np.integer):
        raise ValueError(f"wafer {wafer.lot_id}/{wafer.wafer_id}: prediction has dtype {prediction.dtype}; "
                         "integer class ids are required")
    if prediction.size and (prediction.min() < 0 or prediction.max() >= len(CLASS_NAMES)):
        raise ValueError(f"wafer {wafer.lot_id}/{wafer.wafer_id}: prediction holds class ids outside "
                         f"0..{len(CLASS_NAMES) - 1}")
    return np.where(wafer.map != OFF_WAFER, prediction, 0).astype(np.uint8)


def region_stats(mask: np.ndarray, wafer_map: np.ndarray, counts: np.ndarray) -> dict[str, int]:
    """Per defect class: `regions_<class>`, its 8-connected regions, and `largest_<class>`, the
    largest region's die count (0 when the class is absent). `counts`: class_die_counts of the mask."""
    stats: dict[str, int] = {}
    on_wafer = wafer_map != OFF_WAFER
    for class_id in DEFECT_CLASSES:
        name = CLASS_NAMES[class_id]
        if not counts[class_id]:  # most wafers carry one or two classes: label only those
            stats[f"regions_{name}"] = stats[f"largest_{name}"] = 0
            continue
        labels, regions = label((mask == class_id) & on_wafer, structure=EIGHT_CONNECTED)
        stats[f"regions_{name}"] = int(regions)
        stats[f"largest_{name}"] = int(np.bincount(labels.ravel())[1:].max()) if regions else 0
    return stats


def wafer_row(wafer: Wafer, mask: np.ndarray, model_version: str, min_pattern_dies: int) -> dict:
    counts = class_die_counts(mask, wafer.map)  # once: the summary, the patterns and the regions all need them
    row = wafer_summary(wafer, mask, counts)
    row["patterns"], row["dominant_class"] = patterns_of_counts(counts, min_pattern_dies)
    row.update(region_stats(mask, wafer.map, counts))
    row["model_version"] = model_version
    return row


def wafer_table(wafers: Sequence[Wafer], masks: Sequence[np.ndarray], model_version: str,
                min_pattern_dies: int) -> list[dict]:
    """One row (a dict with WAFER_COLUMNS) per wafer. The lot's tables are plain rows, not DataFrames: a lot
    holds a wafer or two, and pandas' per-call overhead was most of the time a lot report took."""
    return [wafer_row(w, m, model_version, min_pattern_dies) for w, m in zip(wafers, masks)]


def summary_table(lot_id: str, wafers: Sequence[dict], min_pattern_dies: int) -> list[dict]:
    """One row per defect class. A wafer has a class's pattern when its mask holds at least
    `min_pattern_dies` dies of that class (the dominant-class threshold, applied to each class on
    its own, so a wafer with two patterns counts under both). `total_dies` sums the class's dies over
    every reported wafer; `mean_dies_per_affected_wafer` averages them over the affected wafers only
    (empty/NaN when none is affected)."""
    rows = []
    for name in DEFECT_NAMES:
        dies = [row[f"dies_{name}"] for row in wafers]
        affected = [count for count in dies if count >= min_pattern_dies]
        rows.append({"lot_id": lot_id, "class": name, "wafers_with_pattern": len(affected), "total_dies": sum(dies),
                     "mean_dies_per_affected_wafer": sum(affected) / len(affected) if affected else float("nan")})
    return rows


def quarantine_table(lot_id: str, quarantined: Sequence[Rejected]) -> list[dict]:
    return [{"lot_id": record.lot_id or lot_id, "wafer_id": record.wafer_id or "", "source": record.source,
             "reason": record.reason} for record in quarantined]


def shown_path(source: str) -> str:
    """An input's path as a page shows it: its lot directory (or folder) and name, not the absolute path of
    the machine that wrote the report. The CSV and Parquet tables keep the full path."""
    path = Path(source)
    return str(Path(path.parent.name, path.name)) if path.is_absolute() else source


def quarantine_for_page(quarantine: Sequence[dict]) -> list[dict]:
    return [{**row, "source": shown_path(row["source"]),
             "reason": str(row["reason"]).replace(row["source"], shown_path(row["source"]))} for row in quarantine]


# --- images and HTML -------------------------------------------------------------------------


def png_data_uri(colours: np.ndarray) -> str:
    """A palette PNG of viz.PALETTE indices (H, W) as a data URI: a byte a pixel, light compression, no PIL
    (matplotlib's RGBA PNG of an upscaled wafer took 4.2 ms)."""
    return "data:image/png;base64," + base64.b64encode(viz.palette_png(colours, PNG_COMPRESS_LEVEL)).decode("ascii")


def pattern_bar_chart(summary: Sequence[dict]) -> str:
    """Wafers with each pattern, one bar per defect class in its report colour, as an SVG data URI.

    Drawn as SVG text rather than with matplotlib: a lot report is written in milliseconds, and a
    matplotlib figure per lot took longer than predicting the whole lot."""
    width, height, top, bottom, bar, gap = BAR_CHART_SIZE
    counts = [row["wafers_with_pattern"] for row in summary]
    scale = (height - top - bottom) / max(1, max(counts, default=0))
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'font-family="sans-serif" font-size="11">']
    for i, (row, count, class_id) in enumerate(zip(summary, counts, DEFECT_CLASSES)):
        name = row["class"]
        x = gap + i * (bar + gap)
        y = height - bottom - count * scale
        parts.append(f'<rect x="{x}" y="{y:.1f}" width="{bar}" height="{count * scale:.1f}" '
                     f'fill="{viz.CLASS_COLOURS[class_id]}"/>'
                     f'<text x="{x + bar / 2}" y="{y - 3:.1f}" text-anchor="middle">{int(count)}</text>'
                     f'<text x="{x + bar / 2}" y="{height - bottom + 14}" text-anchor="middle">{_e(name)}</text>')
    parts.append(f'<line x1="0" y1="{height - bottom}" x2="{width}" y2="{height - bottom}" stroke="#444"/></svg>')
    return "data:image/svg+xml;base64," + base64.b64encode("".join(parts).encode()).decode("ascii")


def wafer_image(wafer: Wafer, mask: np.ndarray, report: ReportParams) -> str:
    """The map with its mask as inline SVG: a PNG of one pixel a die, shown die_px a die (fewer for a map that
    would exceed max_image_px) without smoothing, under the page's die grid (die_grid_defs). The browser does
    the scaling: drawing and compressing every die as a block of pixels took a tenth of a wafer's CPU time."""
    rows, cols = wafer.shape
    die_px = max(1, min(report.die_px, report.max_image_px // max(rows, cols)))
    grid = (f'<rect width="{cols}" height="{rows}" fill="url(#{DIE_GRID_ID})"/>'
            if report.gap_px and die_px > 2 * report.gap_px else "")
    return (f'<svg class="map" viewBox="0 0 {cols} {rows}" width="{cols * die_px}" height="{rows * die_px}" '
            f'role="img" aria-label="wafer {_e(wafer.wafer_id)}">'
            f'<image href="{png_data_uri(viz.die_colours(wafer.map, mask))}" width="{cols}" height="{rows}"/>'
            f"{grid}</svg>")


def die_grid_defs(report: ReportParams) -> str:
    """The gutter between dies, once a page: an SVG pattern one die square (a wafer image's units are dies)
    whose right and bottom gap_px/die_px are off-wafer white, as the gutter of a die_px drawing."""
    gap = report.gap_px / report.die_px
    return (f'<svg width="0" height="0" style="position:absolute" aria-hidden="true"><defs>'
            f'<pattern id="{DIE_GRID_ID}" width="1" height="1" patternUnits="userSpaceOnUse" fill="{viz.OFF_COLOUR}">'
            f'<rect x="{1 - gap:g}" width="{gap:g}" height="1"/><rect y="{1 - gap:g}" width="1" height="{gap:g}"/>'
            f"</pattern></defs></svg>")


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:1.5rem;color:#222}
h1{margin-bottom:.2rem}h2{margin-top:2rem;border-bottom:1px solid #ddd}
dl.meta{display:grid;grid-template-columns:max-content auto;gap:.2rem 1rem}dl.meta dt{font-weight:600}
table{border-collapse:collapse;font-size:.85rem}th,td{border:1px solid #ddd;padding:.25rem .5rem;text-align:right}
th{background:#f3f4f6;cursor:pointer;user-select:none}td.text,th.text{text-align:left}
th[aria-sort=ascending]::after{content:" \\25B2"}th[aria-sort=descending]::after{content:" \\25BC"}
.legend span{display:inline-block;margin-right:1rem}
.legend i{display:inline-block;width:.9rem;height:.9rem;border:1px solid #999;vertical-align:middle;margin-right:.3rem}
.gallery{display:flex;flex-wrap:wrap;gap:1rem}
figure.wafer{margin:0;padding:.5rem;border:1px solid #ddd;border-radius:4px}
figure.wafer svg.map{display:block;max-width:320px;height:auto}svg.map image{image-rendering:pixelated}
figcaption{font-size:.8rem;margin-top:.3rem}.scroll{overflow-x:auto;max-width:100%}
"""

SORT_SCRIPT = """
(function () {
  function key(row, index) {
    var cell = row.cells[index];
    return cell.hasAttribute("data-sort") ? cell.getAttribute("data-sort") : cell.textContent.trim();
  }
  function wire(table) {
    var headers = table.tHead.rows[0].cells;
    Array.prototype.forEach.call(headers, function (header, index) {
      header.addEventListener("click", function () {
        var ascending = header.getAttribute("aria-sort") !== "ascending";
        var numeric = header.getAttribute("data-type") === "number";
        var body = table.tBodies[0];
        var rows = Array.prototype.slice.call(body.rows);
        rows.sort(function (a, b) {
          var x = key(a, index), y = key(b, index);
          var order = numeric ? Number(x) - Number(y) : x.localeCompare(y, undefined, {numeric: true});
          return ascending ? order : -order;
        });
        Array.prototype.forEach.call(headers, function (other) { other.removeAttribute("aria-sort"); });
        header.setAttribute("aria-sort", ascending ? "ascending" : "descending");
        rows.forEach(function (row) { body.appendChild(row); });
      });
    });
  }
  Array.prototype.forEach.call(document.querySelectorAll("table.sortable"), wire);
  document.body.dataset.ready = "1";
})();
"""


def html_page(title: str, body: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
            f"<style>{STYLE}</style></head>\n<body>\n{body}\n<script>{SORT_SCRIPT}</script>\n</body></html>\n")


def html_table(columns: Sequence[str], rows: Sequence[dict], text_columns: Sequence[str], sortable: bool = True,
               links: dict[str, str] | None = None) -> str:
    """A table of `columns` of `rows` (dicts); numeric columns sort numerically. `links` maps a column to a
    URL template whose `{value}` is the cell, URL-quoted."""
    links = links or {}
    head = "".join(
        f'<th class="text" data-type="text" data-key="{_e(c)}">{_e(c)}</th>' if c in text_columns
        else f'<th data-type="number" data-key="{_e(c)}">{_e(c)}</th>' for c in columns)
    body = []
    for record in rows:
        cells = []
        for column in columns:
            value = record[column]
            missing = value is None or (isinstance(value, float) and value != value)
            sort_key = "" if missing else value if isinstance(value, (int, float)) else _e(value)  # numbers: no escaping
            shown = "" if missing else (f"{value:.1f}" if isinstance(value, float) else str(sort_key))
            if column in links:
                shown = f'<a href="{_e(links[column].format(value=quote(str(value))))}">{shown}</a>'
            css = ' class="text"' if column in text_columns else ""
            cells.append(f'<td{css} data-sort="{sort_key}">{shown}</td>')
        body.append(f"<tr>{''.join(cells)}</tr>")
    css = ' class="sortable"' if sortable else ""
    return f"<table{css}><thead><tr>{head}</tr></thead><tbody>\n{chr(10).join(body)}\n</tbody></table>"


PATTERN_COUNT_COLUMNS = ["class", "wafers_with_pattern", "wafers_dominant", "total_dies",
                         "mean_dies_per_affected_wafer"]


def pattern_counts(summary: Sequence[dict], wafers: Sequence[dict]) -> list[dict]:
    """The page's pattern table (PATTERN_COUNT_COLUMNS): summary.csv's figures plus how many wafers each class
    dominates, and a `none` row for the wafers without any pattern."""
    dominant = Counter(row["dominant_class"] for row in wafers)
    rows = [{**r, "wafers_dominant": dominant[r["class"]]} for r in summary]
    none = dominant[NO_PATTERN]
    rows.append({"class": NO_PATTERN, "wafers_with_pattern": none, "wafers_dominant": none, "total_dies": None,
                 "mean_dies_per_affected_wafer": None})
    return rows


def pattern_sets(wafers: Sequence[dict]) -> list[dict]:
    """Wafers per combination of patterns (`ring+scratch`, `none`...), the most frequent first (ties: in
    the order the wafers first show them)."""
    counts = Counter(row["patterns"] for row in wafers).most_common()
    return [{"patterns": patterns, "wafers": count} for patterns, count in counts]


def legend_html() -> str:
    items = [(viz.PASS_COLOUR, "pass"), (viz.FAIL_COLOUR, "fail (background)")]
    items += [(viz.CLASS_COLOURS[c], CLASS_NAMES[c]) for c in DEFECT_CLASSES]
    spans = "".join(f'<span><i style="background:{colour}"></i>{_e(name)}</span>' for colour, name in items)
    return f'<p class="legend">{spans}</p>'


def wafer_figure(wafer: Wafer, mask: np.ndarray, row: dict, report: ReportParams) -> str:
    present = [f"{name} {row[f'dies_{name}']}" for name in DEFECT_NAMES if row[f"dies_{name}"]]
    caption = (f"<b>{_e(wafer.wafer_id)}</b> &middot; {_e(row['patterns'])}<br>"
               f"{wafer.shape[0]}&times;{wafer.shape[1]}, {row['n_dies']} dies, {row['n_fail']} fail<br>"
               f"{_e(', '.join(present) or 'no pattern dies')}")
    return (f'<figure class="wafer" data-wafer-id="{_e(wafer.wafer_id)}" data-dominant="{_e(row["dominant_class"])}">'
            f'{wafer_image(wafer, mask, report)}'
            f"<figcaption>{caption}</figcaption></figure>")


def lot_page(lot_id: str, wafers: Sequence[Wafer], masks: Sequence[np.ndarray], table: Sequence[dict],
             summary: Sequence[dict], quarantine: Sequence[dict], model_version: str, generated_at: str,
             counts: LotCounts, infer: InferParams, report: ReportParams) -> str:
    wafer_columns = ["wafer_id", "patterns", "dominant_class", "rows", "cols", "n_dies", "n_fail", *DIE_COLUMNS[1:],
                     *SHAPE_COLUMNS]
    figures = "\n".join(wafer_figure(w, m, r, report)
                        for w, m, r in zip(wafers, masks, table))
    quarantine_section = (html_table(QUARANTINE_COLUMNS, quarantine_for_page(quarantine), QUARANTINE_COLUMNS)
                          if quarantine else "<p>No input was quarantined.</p>")
    body = f"""
<h1>Lot {_e(lot_id)}</h1>
<dl class="meta">
<dt>Wafers read</dt><dd id="wafers-read">{counts.read}</dd>
<dt>Wafers reported</dt><dd id="wafers-reported">{counts.reported}</dd>
<dt>Quarantined</dt><dd id="wafers-quarantined">{counts.quarantined}</dd>
<dt>Model version</dt><dd>{_e(model_version)}</dd>
<dt>Generated</dt><dd>{_e(generated_at)}</dd>
</dl>
<h2>Patterns</h2>
<p>A wafer's patterns are the classes the model judges present on it (a rule calibrated on real wafers), each
holding at least {infer.min_pattern_dies} dies of its mask; its dominant class is the pattern with the most dies.
A wafer with several patterns counts under each.</p>
{html_table(PATTERN_COUNT_COLUMNS, pattern_counts(summary, table), ["class"])}
<h3>Pattern sets</h3>
{html_table(["patterns", "wafers"], pattern_sets(table), ["patterns"], sortable=False)}
<p><img alt="wafers with each pattern" src="{pattern_bar_chart(summary)}"></p>
<h2>Wafers</h2>
<p>Click a column header to sort.</p>
<div class="scroll">{html_table(wafer_columns, table, ["wafer_id", "dominant_class"])}</div>
<h2>Wafer maps</h2>
{legend_html()}
{die_grid_defs(report)}
<div class="gallery">
{figures}
</div>
<h2>Quarantined inputs</h2>
{quarantine_section}
"""
    return html_page(f"waferseg lot {lot_id}", body)


# --- writing a lot atomically ----------------------------------------------------------------


def _check_inputs(lot_id: str, wafers: Sequence[Wafer], predictions: Sequence[np.ndarray],
                  quarantined: Sequence[Rejected]) -> None:
    if len(wafers) != len(predictions):
        raise ValueError(f"lot {lot_id}: {len(wafers)} wafers but {len(predictions)} predictions")
    ids = [w.wafer_id for w in wafers]
    if len(set(ids)) != len(ids):
        raise ValueError(f"lot {lot_id}: duplicate wafer ids {sorted({i for i in ids if ids.count(i) > 1})}")
    foreign = sorted({w.lot_id for w in wafers} - {lot_id})
    if foreign:
        raise ValueError(f"lot {lot_id}: wafers of other lots {foreign}")
    both = sorted({r.wafer_id for r in quarantined if r.lot_id in (None, lot_id)} & set(ids))
    if both:
        raise ValueError(f"lot {lot_id}: wafers {both} are both reported and quarantined")


FORMULA_LEADS = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_cell(value: object) -> object:
    """A CSV cell a spreadsheet would run as a formula (text led by = + - @, a tab or CR: CSV injection from a
    hostile id or path) gets a leading apostrophe, which spreadsheets show as text. wafers.parquet keeps them."""
    return f"'{value}" if isinstance(value, str) and value.startswith(FORMULA_LEADS) else value


def csv_text(columns: Sequence[str], rows: Sequence[dict]) -> str:
    """A spreadsheet-safe CSV of `rows`, formatted as pandas' to_csv(index=False) writes it: minimal quoting,
    floats as repr, NaN and None empty."""
    def cell(value: object) -> object:
        return "" if value is None or (isinstance(value, float) and value != value) else spreadsheet_cell(value)

    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows([cell(row[c]) for c in columns] for row in rows)
    return buffer.getvalue()


def write_csv(path: Path, columns: Sequence[str], rows: Sequence[dict]) -> None:
    Path(path).write_text(csv_text(columns, rows), encoding="utf-8", newline="")


def _npy_bytes(array: np.ndarray) -> bytes:
    """np.save's bytes of a C-ordered array: its header (cached per shape and dtype, np.save builds it
    each time at 10x the cost of the rest) and the data."""
    array = np.ascontiguousarray(array)
    return _npy_header(array.shape, array.dtype.str) + array.tobytes()


@functools.lru_cache(maxsize=1024)
def _npy_header(shape: tuple[int, ...], dtype: str) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buffer.getvalue()


def _parquet_bytes(table: Sequence[dict]) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(table, schema=WAFER_SCHEMA), sink)
    return sink.getvalue().to_pybytes()


def lot_files(lot_id: str, wafers: Sequence[Wafer], masks: Sequence[np.ndarray], quarantined: Sequence[Rejected],
              model_version: str, infer: InferParams, report: ReportParams) -> dict[str, bytes]:
    """Every file of a lot report by its path in the lot directory, the manifest (listing the others with
    their sizes and sha256) included: built in memory, so each file is opened once, to write it."""
    files = {f"{MASK_DIR}/{wafer.wafer_id}.npy": _npy_bytes(mask) for wafer, mask in zip(wafers, masks)}
    table = wafer_table(wafers, masks, model_version, infer.min_pattern_dies)
    summary = summary_table(lot_id, table, infer.min_pattern_dies)
    quarantine = quarantine_table(lot_id, quarantined)
    files[WAFERS_CSV] = csv_text(WAFER_COLUMNS, table).encode()
    files["wafers.parquet"] = _parquet_bytes(table)
    files["summary.csv"] = csv_text(SUMMARY_COLUMNS, summary).encode()
    files["quarantine.csv"] = csv_text(QUARANTINE_COLUMNS, quarantine).encode()
    counts = LotCounts(reported=len(wafers), quarantined=len(quarantined))
    generated_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    files[REPORT_FILE] = lot_page(lot_id, wafers, masks, table, summary, quarantine, model_version, generated_at,
                                  counts, infer, report).encode()
    listed = {name: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
              for name, data in sorted(files.items(), key=lambda item: PurePosixPath(item[0]).parts)}
    manifest = {"schema": MANIFEST_SCHEMA, "lot_id": lot_id, "model_version": model_version,
                "generated_at": generated_at, "counts": counts.as_dict(),
                "inputs_sha256": inputs_fingerprint(wafers, quarantined), "files": listed}
    files[MANIFEST_FILE] = json.dumps(manifest, indent=2).encode()
    return files


def inputs_fingerprint(wafers: Sequence[Wafer], quarantined: Sequence[Rejected]) -> str:
    """What a lot's report was made from: every wafer's id, label and map and every rejected input. A lot
    whose inputs changed since (a copy still running when it was read, a wafer added) is reported again."""
    digest = hashlib.sha256()
    for wafer in sorted(wafers, key=lambda w: w.wafer_id):
        digest.update(f"{wafer.wafer_id}\0{wafer.shape}\0{wafer.label}\0".encode())
        digest.update(np.ascontiguousarray(wafer.map).tobytes())
    for item in sorted(quarantined, key=lambda r: (str(r.wafer_id), r.source, r.reason)):
        digest.update(f"{item.wafer_id}\0{item.source}\0{item.reason}\0".encode())
    return digest.hexdigest()


def _write_synced(path: Path, data: bytes) -> None:
    handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    try:
        with os.fdopen(handle, "wb", closefd=False) as stream:
            stream.write(data)
        os.fsync(handle)
    finally:
        os.close(handle)


def write_durably(directory: Path, files: dict[str, bytes]) -> list[Future]:
    """Start writing `files` (paths within `directory`, whose folders exist), each fsynced: a future per file,
    done when it is on disk, so a power cut after the lot directory is renamed into place cannot publish a
    report with empty or partial files. The files are written at once, from threads, so the file system can
    commit them together (ext4 groups them into one journal commit) instead of one commit of milliseconds
    per file."""
    pool = _file_pool(os.getpid())
    return [pool.submit(_write_synced, directory / name, data) for name, data in files.items()]


@functools.cache
def _file_pool(pid: int) -> ThreadPoolExecutor:
    """One pool per process (threads do not survive a fork): starting threads for every lot cost more than
    writing it."""
    return ThreadPoolExecutor(max_workers=FILE_THREADS, thread_name_prefix=f"waferseg-files-{pid}")


def remove_stale_builds(out_root: Path, lot_id: str) -> None:
    """Undo what a killed writer left of the lot's report (atomic.recover_directory); call while holding the lot."""
    recover_directory(Path(out_root) / lot_id)


class ReportWriteError(OSError):
    """A lot report could not be written; nothing of it was left behind and any previous report is intact."""

    def __init__(self, target: Path, error: OSError):
        self.target = target
        previous = "the previous report is kept" if (target / MANIFEST_FILE).is_file() else "no report was written"
        super().__init__(error.errno, f"{target}: report not written ({error.strerror or error}); {previous}")


@dataclass
class LotBuild:
    """A lot report built in its staging directory while its files are written and synced (`written`);
    `publish` waits for them and renames the directory into place. Building the next lot can overlap the
    disk's sync of this one."""

    building: Path
    target: Path
    written: list[Future]
    described: str

    @contextmanager
    def _removed_on_failure(self) -> Iterator[None]:
        try:
            yield
        except BaseException as error:
            futures_wait(self.written)  # no thread still writing into what is removed
            shutil.rmtree(self.building, ignore_errors=True)
            if isinstance(error, OSError):  # disk full, quota, permissions: the previous report is intact
                raise ReportWriteError(self.target, error) from error
            raise

    def publish(self) -> Path:
        with self._removed_on_failure():
            for future in self.written:
                future.result()
            replace_directory(self.building, self.target)
        log.info("lot %s -> %s", self.described, self.target)
        return self.target


def build_lot_report(lot_id: str, wafers: list[Wafer], predictions: list[np.ndarray],
                     quarantined: list[Rejected], out_root: Path, model_version: str,
                     infer: InferParams, report: ReportParams) -> LotBuild:
    """Build `out_root/<lot_id>/` in a staging directory; publish() makes it the lot's report."""
    lot_id = check_id(lot_id, "lot_id", out_root, lot_id)
    _check_inputs(lot_id, wafers, predictions, quarantined)
    masks = [clean_mask(p, w) for p, w in zip(predictions, wafers)]
    target = Path(out_root) / lot_id
    try:
        building = staging_directory(target)
    except OSError as error:
        raise ReportWriteError(target, error) from error
    build = LotBuild(building, target, [], f"{lot_id}: {len(wafers)} wafers reported, {len(quarantined)} quarantined")
    with build._removed_on_failure():
        os.chmod(building, DIR_MODE)
        (building / MASK_DIR).mkdir()
        build.written = write_durably(building, lot_files(lot_id, wafers, masks, quarantined, model_version, infer,
                                                          report))
    return build


def write_lot_report(lot_id: str, wafers: list[Wafer], predictions: list[np.ndarray],
                     quarantined: list[Rejected], out_root: Path, model_version: str,
                     infer: InferParams, report: ReportParams) -> Path:
    """Write `out_root/<lot_id>/` atomically and return it; an existing report of the lot is replaced."""
    return build_lot_report(lot_id, wafers, predictions, quarantined, out_root, model_version, infer,
                            report).publish()


# --- reading reports back --------------------------------------------------------------------


def read_manifest(lot_dir: Path) -> dict | None:
    """The manifest of a complete report, or None when it is missing, unreadable, of an older schema, or
    names a file that is not there or not of the size written (hashes are kept for audits)."""
    try:
        manifest = json.loads((lot_dir / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("schema") != MANIFEST_SCHEMA \
            or not isinstance(manifest.get("files"), dict):
        return None
    for name, record in manifest["files"].items():
        try:
            if (lot_dir / name).stat().st_size != record["bytes"]:
                return None
        except (OSError, TypeError, KeyError):
            return None
    return manifest


def lot_is_current(out_root: Path, lot_id: str, model_version: str, inputs: str | None = None) -> bool:
    """True when `out_root/<lot_id>/` is a complete report written by `model_version` (from the inputs with
    fingerprint `inputs`, when given)."""
    manifest = read_manifest(Path(out_root) / lot_id)
    return manifest is not None and manifest.get("model_version") == model_version \
        and (inputs is None or manifest.get("inputs_sha256") == inputs)


def complete_lots(out_root: Path) -> list[tuple[Path, dict]]:
    """(lot directory, manifest) for every complete report under out_root, by lot id."""
    out_root = Path(out_root)
    if not out_root.is_dir():
        return []
    lots = []
    for lot_dir in sorted(out_root.iterdir()):
        if lot_dir.is_dir() and not lot_dir.name.startswith("."):
            manifest = read_manifest(lot_dir)
            if manifest is not None:
                lots.append((lot_dir, manifest))
    return lots


def index_row(lot_dir: Path, manifest: dict) -> dict:
    counts = manifest.get("counts", {})
    row = {"lot_id": lot_dir.name, "wafers_read": counts.get("read"), "wafers_reported": counts.get("reported"),
           "quarantined": counts.get("quarantined")}
    with open(lot_dir / "summary.csv", encoding="utf-8", newline="") as handle:
        patterns = {row["class"]: row["wafers_with_pattern"] for row in csv.DictReader(handle)}
    row.update({name: int(patterns.get(name, 0)) for name in DEFECT_NAMES})
    row.update({"model_version": manifest.get("model_version", ""), "generated_at": manifest.get("generated_at", "")})
    return row


def write_index(out_root: Path) -> Path:
    """Write `out_root/index.html` (atomically) listing every complete lot with its counts and pattern
    counts (wafers with each pattern), linking to each lot's report."""
    out_root = Path(out_root)
    out_root.mkdir(parents=True, exist_ok=True)
    rows = [index_row(lot_dir, manifest) for lot_dir, manifest in complete_lots(out_root)]
    columns = ["lot_id", "wafers_read", "wafers_reported", "quarantined", *DEFECT_NAMES, "model_version",
               "generated_at"]
    table = pd.DataFrame(rows, columns=columns)
    body = (f"<h1>waferseg lot reports</h1><p>{len(table)} lots, {int(table['wafers_reported'].sum())} wafers "
            f"reported, {int(table['quarantined'].sum())} quarantined. Pattern columns count the wafers "
            f"with each pattern. Click a column header to sort.</p>"
            + html_table(columns, table.to_dict("records"), ["lot_id", "model_version", "generated_at"],
                         links={"lot_id": "{value}/" + REPORT_FILE}))
    target = out_root / INDEX_FILE
    with atomic_file(target, mode=FILE_MODE) as staging:
        staging.write_text(html_page("waferseg lot reports", body), encoding="utf-8")
    log.info("index of %d lots -> %s", len(table), target)
    return target
