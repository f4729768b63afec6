"""A lot may not take the name of a file the report root holds beside its lots (index.html, quarantine.csv):
such a lot's wafers are quarantined with the reason, every other lot is reported, and the run ends well."""

from __future__ import annotations

import pandas as pd
import pytest
from typer.testing import CliRunner

from pipeline import io
from pipeline.cli import app
from pipeline.infer import UNASSIGNED_QUARANTINE, infer
from pipeline.wafer import WaferError, check_id

from .catalogue import good_wafers
from .test_bad_input_catalogue import assert_nothing_lost


def tree_with_lot(tmp_path, name: str, wafers: int):
    """Lot `okl` (2 good wafers) and a lot directory `name` of `wafers` good wafers (the writer refuses the name)."""
    tree = tmp_path / "lots"
    io.write_npy_lots(good_wafers("okl", 2), tree)
    io.write_npy_lots(good_wafers("x", wafers), tmp_path / "staging")
    (tmp_path / "staging" / "x").rename(tree / name)
    return tree


@pytest.mark.parametrize("name", ["index.html", "quarantine.csv", "INDEX.HTML"])
def test_a_lot_named_like_a_run_file_is_quarantined_and_the_rest_reported(name, tmp_path, params, checkpoint):
    tree = tree_with_lot(tmp_path, name, 3)
    out = tmp_path / "out"

    summary = infer(tree, out, params, model_uri=checkpoint)

    assert (summary.read, summary.reported, summary.quarantined) == (5, 2, 3)
    assert (out / "index.html").is_file() and (out / UNASSIGNED_QUARANTINE).is_file()
    rows = pd.read_csv(out / UNASSIGNED_QUARANTINE)
    assert len(rows) == 3 and rows["reason"].str.contains(f"lot_id '{name}' is reserved", regex=False).all()
    assert_nothing_lost(out, summary)


def test_cli_infer_on_a_tree_with_an_index_html_lot_succeeds(tmp_path, checkpoint):
    """The reproduced crash: lot directories index.html/ and okl/ ended in IsADirectoryError."""
    tree = tree_with_lot(tmp_path, "index.html", 1)
    (tmp_path / "params.yaml").write_text("model: {width: 0.0625}\ntrain: {device: cpu}\n")
    result = CliRunner().invoke(app, ["infer", str(tree), "--out", str(tmp_path / "out"), "--model", checkpoint,
                                      "--params", str(tmp_path / "params.yaml")])
    assert result.exit_code == 0, result.output
    assert "read 3 wafers: reported 2, quarantined 1" in " ".join(result.output.split())


def test_reserved_names_are_refused_only_as_lot_ids():
    with pytest.raises(WaferError, match="is reserved"):
        check_id("Quarantine.CSV", "lot_id", "src")
    assert check_id("index.html", "wafer_id", "src") == "index.html"
