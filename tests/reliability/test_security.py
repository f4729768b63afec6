"""Security: checkpoints are never unpickled beyond tensors and plain values; inbox entries are never unpickled;
reports show hostile ids as text."""

from __future__ import annotations

import pickle

import numpy as np
import pandas as pd
import pytest
import torch

from browser import CHROMIUM, open_page
from pipeline import infer, io, registry, report, versioning
from pipeline.model import build_model
from pipeline.params import InferParams, ReportParams
from pipeline.checkpoint import restore_training
from pipeline.wafer import validate_wafer

from .catalogue import Payload, good_wafer, marker_of

HOSTILE_LOT = "<img src=x onerror=document.body.dataset.pwned=1>"
HOSTILE_WAFER = "<svg onload=document.body.dataset.pwned=2>"


@pytest.fixture
def booby_trapped(tmp_path, checkpoint):
    """A real checkpoint with one more entry whose unpickling would run code (create the marker file)."""
    data = torch.load(checkpoint, weights_only=True)
    data["extra"] = Payload(marker_of(tmp_path))
    path = tmp_path / "trapped.pt"
    torch.save(data, path)
    return path


def test_registry_refuses_a_checkpoint_that_would_run_code(booby_trapped, params):
    with pytest.raises(ValueError, match=r"trapped.pt: refused: a checkpoint may hold only tensors and plain values"):
        registry.load_model(str(booby_trapped), params.registry, torch.device("cpu"))
    assert not marker_of(booby_trapped.parent).exists()


def test_resume_refuses_a_checkpoint_that_would_run_code(booby_trapped, params):
    model = build_model(params.model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    with pytest.raises(ValueError, match=r"refused: a checkpoint may hold only tensors"):
        restore_training(booby_trapped, model, optimizer, scheduler)
    assert not marker_of(booby_trapped.parent).exists()


def test_a_plain_checkpoint_still_loads(checkpoint, params):
    model, version = registry.load_model(checkpoint, params.registry, torch.device("cpu"))
    assert version.startswith("checkpoint:model.pt:") and not model.training


@pytest.mark.skipif(not CHROMIUM.exists(), reason=f"headless Chromium not installed at {CHROMIUM} "
                    "(Debian package 'chromium'; `make test` installs it in CI)")
def test_hostile_ids_are_shown_as_text_in_the_browser(tmp_path):
    base = good_wafer(HOSTILE_LOT, "w0")
    wafer = validate_wafer(HOSTILE_LOT, HOSTILE_WAFER, base.map, source=f"inbox/{HOSTILE_WAFER}.npy")
    prediction = np.where(wafer.map == 2, 3, 0).astype(np.uint8)
    lot_dir = report.write_lot_report(HOSTILE_LOT, [wafer], [prediction], [], tmp_path / "out", "v1",
                                      InferParams(min_pattern_dies=1), ReportParams())
    report.write_index(tmp_path / "out")
    for page_path in (lot_dir / "report.html", tmp_path / "out" / "index.html"):
        with open_page(page_path.as_uri()) as page:
            assert page.evaluate("document.body.dataset.ready") == "1"
            text = page.evaluate("document.body.innerText")
            assert HOSTILE_LOT in text, page_path
            assert page.evaluate("document.body.dataset.pwned === undefined"), f"markup from an id ran in {page_path}"
            assert page.evaluate("document.querySelectorAll('img[src=x], svg[onload]').length") == 0
            assert page.problems().errors() == []
        if page_path.name == "report.html":
            assert HOSTILE_WAFER in text


def test_a_pickle_dropped_into_the_labelled_inbox_is_quarantined_unopened(tmp_path, params):
    """The reproduced hole: `evil.pkl` in inbox/labelled, then `waferseg ingest` (no sources named)."""
    workspace = tmp_path / "ws"
    inbox = workspace / params.data.inbox
    inbox.mkdir(parents=True)
    evil = inbox / "evil.pkl"
    evil.write_bytes(pickle.dumps(Payload(marker_of(tmp_path))))

    result = versioning.ingest(params, workspace=workspace)

    assert not marker_of(tmp_path).exists(), "ingest unpickled an inbox entry"
    assert list(result.quarantined) == [str(evil)] and result.wafers_added == 0
    assert "pickles are only read when named explicitly" in result.quarantined[str(evil)]
    assert (workspace / params.data.quarantine / "evil.pkl").is_file()


def test_a_pickle_at_the_top_of_the_lots_inbox_is_quarantined_unopened(tmp_path, params, checkpoint):
    """infer_lots and the nightly hand each inbox entry to infer unnamed."""
    inbox = tmp_path / "lots"
    io.write_npy_lots([good_wafer("LOT-A", "w0")], inbox)
    (inbox / "evil.pkl").write_bytes(pickle.dumps(Payload(marker_of(tmp_path))))

    summary = infer.infer(infer.inbox_sources(inbox), tmp_path / "out", params, model_uri=checkpoint)

    assert not marker_of(tmp_path).exists(), "infer unpickled an inbox entry"
    assert (summary.read, summary.reported, summary.quarantined) == (2, 1, 1)
    rows = pd.read_csv(tmp_path / "out" / infer.UNASSIGNED_QUARANTINE)
    assert rows["reason"].str.contains("pickles are only read when named explicitly").all()


def test_a_symlinked_lot_at_the_top_of_an_inbox_is_not_followed(tmp_path, params, checkpoint):
    outside = tmp_path / "elsewhere"
    io.write_npy_lots([good_wafer("SECRET", "w0")], outside)
    inbox = tmp_path / "lots"
    io.write_npy_lots([good_wafer("LOT-A", "w0")], inbox)
    (inbox / "SECRET").symlink_to(outside / "SECRET", target_is_directory=True)

    summary = infer.infer(infer.inbox_sources(inbox), tmp_path / "out", params, model_uri=checkpoint)

    assert (summary.read, summary.reported, summary.quarantined) == (2, 1, 1)
    assert not (tmp_path / "out" / "SECRET").exists()
    rows = pd.read_csv(tmp_path / "out" / infer.UNASSIGNED_QUARANTINE)
    assert rows["reason"].str.contains("symbolic link that leads out of its directory").all()

    labelled = tmp_path / "ws" / params.data.inbox
    labelled.mkdir(parents=True)
    (labelled / "SECRET").symlink_to(outside / "SECRET", target_is_directory=True)
    result = versioning.ingest(params, workspace=tmp_path / "ws")
    assert result.wafers_added == 0 and "symbolic link" in result.quarantined[str(labelled / "SECRET")]
    assert (outside / "SECRET" / "w0.npy").is_file(), "the link's target must be left alone"


def test_ids_a_spreadsheet_would_run_are_written_as_text_in_csv(tmp_path):
    lot, wafer_id = "=SUM(1,2)", "+1-2"
    base = good_wafer("LOT", "w0")
    wafer = validate_wafer(lot, wafer_id, base.map, source="@inbox/w.npy")
    prediction = np.where(wafer.map == 2, 3, 0).astype(np.uint8)
    lot_dir = report.write_lot_report(lot, [wafer], [prediction], [], tmp_path / "out", "v1",
                                      InferParams(min_pattern_dies=1), ReportParams())
    rows = pd.read_csv(lot_dir / report.WAFERS_CSV, dtype=str)
    assert (rows.loc[0, "lot_id"], rows.loc[0, "wafer_id"]) == (f"'{lot}", f"'{wafer_id}")
    assert pd.read_csv(lot_dir / "summary.csv", dtype=str)["lot_id"].str.startswith("'=").all()
    exact = pd.read_parquet(lot_dir / "wafers.parquet")
    assert (exact.loc[0, "lot_id"], exact.loc[0, "wafer_id"]) == (lot, wafer_id)
