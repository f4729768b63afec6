"""Security: checkpoints are never unpickled beyond tensors and plain values; reports show hostile ids as text."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from browser import CHROMIUM, open_page
from pipeline import registry, report
from pipeline.model import build_model
from pipeline.params import InferParams, ReportParams
from pipeline.train import load_checkpoint
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
        load_checkpoint(booby_trapped, model, optimizer, scheduler)
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
