import json
from pathlib import Path

import matplotlib.image
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from pipeline import report
from pipeline.io import Rejected
from pipeline.params import InferParams, ReportParams
from pipeline.viz import CLASS_COLOURS
from pipeline.wafer import validate_wafer

from browser import CHROMIUM, open_page

LOT = "LOT-A"
MODEL = "wafer-fcn8s/3"
INFER = InferParams(min_pattern_dies=5)
REPORT = ReportParams(die_px=6, gap_px=1)
RING, SCRATCH, LOCAL_ZONE, CIRCLE = 1, 2, 3, 4

WAFER_COLUMNS = ["lot_id", "wafer_id", "rows", "cols", "n_dies", "n_fail", "dies_background", "dies_ring",
                 "dies_scratch", "dies_local_zone", "dies_circle", "patterns", "dominant_class",
                 "regions_ring", "largest_ring", "regions_scratch", "largest_scratch",
                 "regions_local_zone", "largest_local_zone", "regions_circle", "largest_circle", "model_version"]
SUMMARY_COLUMNS = ["lot_id", "class", "wafers_with_pattern", "total_dies", "mean_dies_per_affected_wafer"]
QUARANTINE_COLUMNS = ["lot_id", "wafer_id", "source", "reason"]


def _disc(size: int) -> np.ndarray:
    """A round wafer: pass dies inside the inscribed circle, off-wafer outside."""
    centre = (size - 1) / 2
    rows, cols = np.mgrid[:size, :size]
    return np.where((rows - centre) ** 2 + (cols - centre) ** 2 <= (size / 2) ** 2, 1, 0).astype(np.uint8)


def _wafer(wafer_id: str, wafer_map: np.ndarray, mask: np.ndarray):
    wafer_map = wafer_map.copy()
    wafer_map[(mask > 0) & (wafer_map > 0)] = 2  # pattern dies fail
    return validate_wafer(LOT, wafer_id, wafer_map, source=f"inbox/{LOT}/{wafer_id}.npy")


def _two_scratches() -> tuple:
    """12x12: two separate scratch lines of 6 and 4 dies, a 3-die local zone (below the threshold)."""
    mask = np.zeros((12, 12), np.uint8)
    mask[3, 3:9] = SCRATCH
    mask[8, 4:8] = SCRATCH
    mask[5:7, 10] = LOCAL_ZONE
    mask[5, 9] = LOCAL_ZONE
    return _wafer("01", _disc(12), mask), mask


def _ring_and_circle() -> tuple:
    """16x16: an edge ring and a centre disc; the 8-connected ring is one region."""
    wafer_map = _disc(16)
    inner = np.pad(_disc(12), 2)
    mask = np.where((wafer_map > 0) & (inner == 0), RING, 0).astype(np.uint8)
    mask[6:10, 6:10] = CIRCLE
    return _wafer("02", wafer_map, mask), mask


def _clean_but_noisy_off_wafer() -> tuple:
    """10x14 with no pattern on-wafer; the model wrote ring ids off-wafer, which the report drops."""
    wafer_map = np.ones((10, 14), np.uint8)
    wafer_map[0, :3] = 0
    prediction = np.where(wafer_map == 0, RING, 0).astype(np.int64)
    wafer = validate_wafer(LOT, "03", wafer_map, source=f"inbox/{LOT}/03.npy")
    return wafer, prediction


def _scratch_only() -> tuple:
    mask = np.zeros((12, 12), np.uint8)
    mask[2:10, 6] = SCRATCH  # 8 dies, one line
    return _wafer("04", _disc(12), mask), mask


def _lot() -> tuple[list, list, list]:
    pairs = [_two_scratches(), _ring_and_circle(), _clean_but_noisy_off_wafer(), _scratch_only()]
    quarantined = [Rejected(source=f"inbox/{LOT}/05.npy", lot_id=LOT, wafer_id="05",
                            reason="map holds values [3] outside {0, 1, 2}")]
    return [w for w, _ in pairs], [p for _, p in pairs], quarantined


@pytest.fixture()
def lot_dir(tmp_path: Path) -> Path:
    wafers, predictions, quarantined = _lot()
    return report.write_lot_report(LOT, wafers, predictions, quarantined, tmp_path / "out", MODEL, INFER, REPORT)


def test_every_output_file_has_the_contract_schema(lot_dir: Path):
    assert pd.read_csv(lot_dir / "wafers.csv").columns.tolist() == WAFER_COLUMNS
    parquet = pd.read_parquet(lot_dir / "wafers.parquet")
    assert parquet.columns.tolist() == WAFER_COLUMNS
    assert all(parquet[c].dtype == np.int64 for c in WAFER_COLUMNS if c.startswith(("dies_", "regions_", "largest_")))
    assert pd.read_csv(lot_dir / "summary.csv").columns.tolist() == SUMMARY_COLUMNS
    assert pd.read_csv(lot_dir / "quarantine.csv").columns.tolist() == QUARANTINE_COLUMNS
    expected = {"manifest.json", "report.html", "wafers.csv", "wafers.parquet", "summary.csv", "quarantine.csv",
                *(f"masks/{w}.npy" for w in ("01", "02", "03", "04"))}
    assert {p.relative_to(lot_dir).as_posix() for p in lot_dir.rglob("*") if p.is_file()} == expected


def test_masks_are_uint8_in_the_map_shape_with_off_wafer_zero(lot_dir: Path):
    wafers, predictions, _ = _lot()
    for wafer, prediction in zip(wafers, predictions):
        mask = np.load(lot_dir / "masks" / f"{wafer.wafer_id}.npy")
        assert mask.dtype == np.uint8 and mask.shape == wafer.shape
        np.testing.assert_array_equal(mask, np.where(wafer.map > 0, prediction, 0))
    assert not np.load(lot_dir / "masks" / "03.npy").any()


def test_wafer_rows_count_dies_regions_and_dominant_class(lot_dir: Path):
    rows = pd.read_csv(lot_dir / "wafers.csv", dtype={"wafer_id": str}).set_index("wafer_id")
    two_scratches = rows.loc["01"]
    assert (two_scratches["dies_scratch"], two_scratches["regions_scratch"], two_scratches["largest_scratch"]) == (10, 2, 6)
    assert (two_scratches["dies_local_zone"], two_scratches["regions_local_zone"]) == (3, 1)
    assert two_scratches["dominant_class"] == "scratch"
    assert two_scratches["patterns"] == "scratch"  # 3 local_zone dies are below min_pattern_dies (5)
    assert two_scratches["dies_background"] == two_scratches["n_dies"] - 13
    ring = rows.loc["02"]
    assert (ring["regions_ring"], ring["regions_circle"], ring["largest_circle"]) == (1, 1, 16)
    assert ring["largest_ring"] == ring["dies_ring"] > 16
    assert ring["dominant_class"] == "ring"
    assert ring["patterns"] == "ring+circle"  # a mixed-pattern wafer: both, in class-id order
    clean = rows.loc["03"]
    assert (clean["rows"], clean["cols"], clean["n_dies"], clean["n_fail"]) == (10, 14, 137, 0)
    assert clean["dominant_class"] == "none" and clean["dies_background"] == 137 and clean["regions_ring"] == 0
    assert clean["patterns"] == "none"
    # every class in `patterns` has at least min_pattern_dies dies; dominant_class is the one with most
    for _, row in rows.iterrows():
        named = [] if row["patterns"] == "none" else row["patterns"].split("+")
        assert all(row[f"dies_{name}"] >= INFER.min_pattern_dies for name in named)
        assert row["dominant_class"] == (max(named, key=lambda n: row[f"dies_{n}"]) if named else "none")
    assert rows.loc["04", "dominant_class"] == "scratch"
    assert set(rows["model_version"]) == {MODEL} and set(rows["lot_id"]) == {LOT}


def test_summary_counts_wafers_at_or_above_min_pattern_dies(lot_dir: Path):
    summary = pd.read_csv(lot_dir / "summary.csv").set_index("class")
    assert summary.index.tolist() == ["ring", "scratch", "local_zone", "circle"]
    assert summary.loc["scratch", "wafers_with_pattern"] == 2
    assert summary.loc["scratch", "total_dies"] == 18
    assert summary.loc["scratch", "mean_dies_per_affected_wafer"] == 9.0
    # 3 local-zone dies are counted in total_dies but are no pattern: nothing to average
    assert summary.loc["local_zone", "wafers_with_pattern"] == 0 and summary.loc["local_zone", "total_dies"] == 3
    assert np.isnan(summary.loc["local_zone", "mean_dies_per_affected_wafer"])
    assert summary.loc["circle"].tolist()[1:] == [1, 16, 16.0]


def test_quarantine_lists_records_and_is_header_only_when_empty(lot_dir: Path, tmp_path: Path):
    quarantine = pd.read_csv(lot_dir / "quarantine.csv", dtype=str)
    assert quarantine.to_dict("records") == [{"lot_id": LOT, "wafer_id": "05", "source": f"inbox/{LOT}/05.npy",
                                              "reason": "map holds values [3] outside {0, 1, 2}"}]
    clean = report.write_lot_report("LOT-B", [], [], [], tmp_path / "out", MODEL, INFER, REPORT)
    assert (clean / "quarantine.csv").read_text() == "lot_id,wafer_id,source,reason\n"


def test_csv_files_are_written_as_pandas_writes_them(tmp_path: Path):
    rows = [{"text": "=1+1", "count": 3, "mean": 12.5, "other": "a,b"},
            {"text": 'say "hi"\nthere', "count": 0, "mean": float("nan"), "other": "-x"},
            {"text": "", "count": -4, "mean": 1 / 3, "other": "\tlead"}]
    columns = ["text", "count", "mean", "other"]
    report.write_csv(tmp_path / "plain.csv", columns, rows)
    frame = pd.DataFrame(rows, columns=columns)
    text = [name for name in columns if not pd.api.types.is_numeric_dtype(frame[name])]
    frame.assign(**{name: frame[name].map(report.spreadsheet_cell) for name in text}).to_csv(
        tmp_path / "pandas.csv", index=False)
    assert (tmp_path / "plain.csv").read_bytes() == (tmp_path / "pandas.csv").read_bytes()


def test_wafers_parquet_has_one_schema_for_every_lot(lot_dir: Path, tmp_path: Path):
    empty = report.write_lot_report("LOT-B", [], [], [], tmp_path / "other", MODEL, INFER, REPORT)
    schemas = [pq.read_schema(d / "wafers.parquet").remove_metadata() for d in (lot_dir, empty)]
    assert schemas[0] == schemas[1] == report.WAFER_SCHEMA
    assert pq.read_table(lot_dir / "wafers.parquet").to_pylist() == pd.read_csv(
        lot_dir / "wafers.csv", dtype={"wafer_id": str}).to_dict("records")


def test_every_file_is_on_disk_before_the_lot_is_published(tmp_path: Path, monkeypatch):
    synced, published = [], []
    real_write, real_replace = report._write_synced, report.replace_directory
    monkeypatch.setattr(report, "_write_synced", lambda path, data: (real_write(path, data), synced.append(path)))
    monkeypatch.setattr(report, "replace_directory", lambda built, target: (
        published.append({p for p in built.rglob("*") if p.is_file()}), real_replace(built, target)))
    report.write_lot_report(LOT, *_lot()[:2], [], tmp_path / "out", MODEL, INFER, REPORT)
    assert published[0] == set(synced) and len(synced) == 4 + 6  # 4 masks; 4 tables, the page and the manifest


def test_a_page_shows_inputs_without_the_absolute_paths_of_the_machine(tmp_path: Path):
    source = str(tmp_path / "private" / "inbox" / LOT / "05.npy")
    rejected = [Rejected(source=source, lot_id=LOT, wafer_id="05", reason=f"{source}: unreadable or corrupt .npy file")]
    lot = report.write_lot_report(LOT, [], [], rejected, tmp_path / "out", MODEL, INFER, REPORT)
    page = (lot / "report.html").read_text()
    assert str(tmp_path) not in page
    assert f">{LOT}/05.npy<" in page and f"{LOT}/05.npy: unreadable or corrupt .npy file" in page
    assert pd.read_csv(lot / "quarantine.csv", dtype=str)["source"].tolist() == [source]  # the tables keep it


def test_manifest_counts_and_lot_is_current(lot_dir: Path):
    manifest = json.loads((lot_dir / "manifest.json").read_text())
    assert manifest["model_version"] == MODEL and manifest["lot_id"] == LOT
    assert manifest["counts"] == {"read": 5, "reported": 4, "quarantined": 1}
    assert "manifest.json" not in manifest["files"] and "report.html" in manifest["files"]
    out_root = lot_dir.parent
    assert report.lot_is_current(out_root, LOT, MODEL)
    assert not report.lot_is_current(out_root, LOT, "wafer-fcn8s/4")
    assert not report.lot_is_current(out_root, "LOT-Z", MODEL)
    wafers, _, quarantined = _lot()
    inputs = report.inputs_fingerprint(wafers, quarantined)
    assert manifest["inputs_sha256"] == inputs and report.lot_is_current(out_root, LOT, MODEL, inputs)
    # a lot read again with one wafer more (it was still being copied) is not current
    assert not report.lot_is_current(out_root, LOT, MODEL, report.inputs_fingerprint(wafers[:-1], quarantined))
    assert manifest["files"]["wafers.csv"]["bytes"] == (lot_dir / "wafers.csv").stat().st_size
    with open(lot_dir / "wafers.csv", "r+b") as handle:  # a file cut short after the manifest was written
        handle.truncate(10)
    assert not report.lot_is_current(out_root, LOT, MODEL)
    (lot_dir / "summary.csv").unlink()  # a manifest naming a missing file is no complete report
    assert not report.lot_is_current(out_root, LOT, MODEL)


def test_a_second_write_replaces_the_report_and_leaves_nothing_aside(lot_dir: Path):
    wafers, predictions, quarantined = _lot()
    report.write_lot_report(LOT, wafers[:2], predictions[:2], quarantined, lot_dir.parent, "v2", INFER, REPORT)
    assert report.lot_is_current(lot_dir.parent, LOT, "v2") and not report.lot_is_current(lot_dir.parent, LOT, MODEL)
    assert sorted(p.name for p in lot_dir.glob("masks/*")) == ["01.npy", "02.npy"]
    assert [p.name for p in lot_dir.parent.iterdir()] == [LOT]


def _crash(*args, **kwargs):
    raise RuntimeError("renderer crashed")


def test_a_crash_mid_write_leaves_no_report_and_no_temp_dir(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(report, "lot_page", _crash)
    wafers, predictions, quarantined = _lot()
    out_root = tmp_path / "out"
    with pytest.raises(RuntimeError, match="renderer crashed"):
        report.write_lot_report(LOT, wafers, predictions, quarantined, out_root, MODEL, INFER, REPORT)
    assert list(out_root.iterdir()) == []


def test_a_crash_mid_rewrite_keeps_the_old_complete_report(lot_dir: Path, monkeypatch):
    before = {p.relative_to(lot_dir): p.read_bytes() for p in lot_dir.rglob("*") if p.is_file()}
    monkeypatch.setattr(report, "lot_page", _crash)
    wafers, predictions, quarantined = _lot()
    with pytest.raises(RuntimeError, match="renderer crashed"):
        report.write_lot_report(LOT, wafers[:1], predictions[:1], [], lot_dir.parent, "v2", INFER, REPORT)
    assert {p.relative_to(lot_dir): p.read_bytes() for p in lot_dir.rglob("*") if p.is_file()} == before
    assert [p.name for p in lot_dir.parent.iterdir()] == [LOT]
    assert report.lot_is_current(lot_dir.parent, LOT, MODEL)


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda w, p, q: (w, p[:3], q), "4 wafers but 3 predictions"),
        (lambda w, p, q: (w, [p[0][:5], *p[1:]], q), r"prediction shape \(5, 12\) differs from map shape \(12, 12\)"),
        (lambda w, p, q: (w, [p[0] + 5, *p[1:]], q), r"class ids outside 0..4"),
        (lambda w, p, q: (w, [p[0].astype(np.float32), *p[1:]], q), "dtype float32"),
        (lambda w, p, q: ([w[0], w[0]], p[:2], q), r"duplicate wafer ids \['01'\]"),
        (lambda w, p, q: (w, p, [Rejected("x.npy", LOT, "01", "bad")]), r"both reported and quarantined"),
    ],
)
def test_inconsistent_inputs_are_refused_before_writing(tmp_path: Path, change, problem):
    wafers, predictions, quarantined = change(*_lot())
    with pytest.raises(ValueError, match=problem):
        report.write_lot_report(LOT, wafers, predictions, quarantined, tmp_path, MODEL, INFER, REPORT)
    assert list(tmp_path.iterdir()) == []


def test_index_lists_every_complete_lot(lot_dir: Path):
    out_root = lot_dir.parent
    report.write_lot_report("LOT B#2", [], [], [Rejected("b.csv", None, None, "no rows")], out_root, MODEL,
                            INFER, REPORT)
    (out_root / "LOT-HALF").mkdir()  # no manifest: not a report
    (out_root / ".tmp-LOT-C-abcd").mkdir()
    index = report.write_index(out_root)
    page = index.read_text()
    assert index == out_root / "index.html"
    assert 'href="LOT-A/report.html"' in page and 'href="LOT%20B%232/report.html"' in page
    assert "LOT-HALF" not in page and "LOT-C" not in page
    assert "<script src" not in page and "<link" not in page
    assert not list(out_root.glob(".index.html.*"))


def _colour_pixels(image: np.ndarray, hex_colour: str) -> int:
    rgb = np.array([int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)]) / 255
    return int(np.all(np.abs(image[..., :3] - rgb) <= 2 / 255, axis=-1).sum())


WAFER_ORDER_JS = "[...document.querySelectorAll('table.sortable')[1].tBodies[0].rows].map(r => r.cells[0].textContent)"


@pytest.mark.skipif(not CHROMIUM.exists(), reason=f"headless Chromium not installed at {CHROMIUM} "
                    "(Debian package 'chromium'; `make test` installs it in CI)")
def test_report_renders_in_a_real_browser(lot_dir: Path, tmp_path: Path):
    report.write_index(lot_dir.parent)
    with open_page((lot_dir / "report.html").as_uri()) as page:
        assert page.evaluate("document.body.dataset.ready") == "1"
        assert page.evaluate("document.querySelectorAll('figure[data-wafer-id]').length") == 4
        assert page.evaluate("[...document.images].every(i => i.complete && i.naturalWidth > 0)")
        assert page.evaluate("document.getElementById('wafers-quarantined').textContent") == "1"
        page.evaluate("document.querySelector('th[data-key=dies_scratch]').click()")
        assert page.evaluate(WAFER_ORDER_JS) == ["02", "03", "04", "01"]
        page.evaluate("document.querySelector('th[data-key=dominant_class]').click()")
        page.evaluate("document.querySelector('th[data-key=dominant_class]').click()")
        assert page.evaluate(WAFER_ORDER_JS)[:2] == ["04", "01"]  # descending: scratch first
        screenshot = page.screenshot(tmp_path / "report.png")
        gridded = page.evaluate("document.querySelectorAll('svg.map rect[fill=\"url(#die-grid)\"]').length")
        grid_tiles = page.evaluate("document.querySelectorAll('pattern#die-grid > rect').length")
        problems = page.problems()
    assert problems.errors() == []
    assert all(url == (lot_dir / "report.html").as_uri() or url.startswith("data:") for url in problems.requested_urls)
    image = matplotlib.image.imread(screenshot)
    assert image.shape[:2] == (3000, 1400) and screenshot.stat().st_size > 20_000
    assert all(_colour_pixels(image, CLASS_COLOURS[c]) > 100 for c in (RING, SCRATCH, CIRCLE))
    assert gridded == 4 and grid_tiles == 2  # every wafer drawn under the page's one die-grid pattern (in the SVG DOM)

    with open_page((lot_dir.parent / "index.html").as_uri()) as index:
        assert index.evaluate("document.body.dataset.ready") == "1"
        assert index.evaluate("[...document.links].map(a => a.getAttribute('href'))") == ["LOT-A/report.html"]
        assert index.problems().errors() == []


def test_a_wafer_image_is_a_palette_png_of_one_pixel_a_die_shown_die_px_a_die_under_the_die_grid():
    import base64
    import io
    import re

    from PIL import Image

    from pipeline import viz

    wafer, mask = _ring_and_circle()
    wafer_map, mask = wafer.map.copy(), mask.copy()
    wafer_map[4, 4] = 2  # a failing die of no pattern
    mask[7, 2:5], mask[9, 3] = SCRATCH, LOCAL_ZONE  # on pass dies: drawn in the class colour
    mask[wafer_map == 0] = RING  # a class on an off-wafer die is not drawn
    svg = report.wafer_image(validate_wafer(LOT, "w", wafer_map), mask, REPORT)
    rows, cols = wafer_map.shape
    assert svg.startswith(f'<svg class="map" viewBox="0 0 {cols} {rows}" width="{cols * REPORT.die_px}" '
                          f'height="{rows * REPORT.die_px}"')
    assert f'fill="url(#{report.DIE_GRID_ID})"' in svg  # the gutter, drawn by the page's pattern
    uri = re.search(r'<image href="([^"]+)" width="%d" height="%d"/>' % (cols, rows), svg).group(1)
    image = Image.open(io.BytesIO(base64.b64decode(uri.removeprefix("data:image/png;base64,"))))
    assert image.mode == "P"
    expected = viz.colour_dies(wafer_map, mask)
    assert np.array_equal(np.asarray(image.convert("RGB")), expected)
    assert {tuple(c) for c in expected.reshape(-1, 3)} >= {tuple(viz.PALETTE[i]) for i in range(7)}
    pattern = report.die_grid_defs(REPORT)  # the right and bottom 1/6 of each die white: a 1-pixel gutter at 6
    assert f'id="{report.DIE_GRID_ID}"' in pattern and '<rect x="0.833333" width="0.166667" height="1"/>' in pattern
    tiny = report.wafer_image(validate_wafer(LOT, "w", wafer_map), mask, ReportParams(die_px=2, gap_px=1))
    assert "url(#" not in tiny  # dies of 2 pixels: no gutter, as before


