"""Every kind of bad input of the catalogue, through `waferseg infer` and through ingest: a clear message
naming the file (and wafer), a quarantine row, the good wafers beside it processed, and nothing lost."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from pipeline import atomic, io, report, versioning
from pipeline.cli import app
from pipeline.dataset import INDEX_FILE, WaferDataset
from pipeline.infer import LOCKS_DIR, UNASSIGNED_QUARANTINE, InferSummary, infer
from pipeline.locks import release, try_lock
from pipeline.wafer import WaferError

from .catalogue import CASES, Built, Case, good_wafers, marker_of
from .workloads import PROJECT

CASE_IDS = [case.kind for case in CASES]
QUARANTINE_CSV = "quarantine.csv"  # a lot's quarantine (CONTRACT.md, "Report outputs")
CLI_CASES = ["npy_truncated", "npy_object_array_with_pickle", "dies_non_numeric_bin.csv", "dies_unsafe_lot_id.csv",
             "wafer_table_bad_failure_type"]


def _case(kind: str) -> Case:
    return next(case for case in CASES if case.kind == kind)


def _table(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def _quarantine_rows(out: Path, lot: str | None) -> pd.DataFrame:
    return _table(out / UNASSIGNED_QUARANTINE if lot is None else out / lot / QUARANTINE_CSV)


def assert_nothing_lost(out: Path, summary: InferSummary) -> None:
    """Read = reported + quarantined + skipped, by the summary and by the files; no partial output."""
    assert summary.read == summary.reported + summary.quarantined + summary.skipped
    leftovers = [p.name for p in out.iterdir() if p.name.startswith(".") and p.name != LOCKS_DIR]
    assert leftovers == [], f"temporary files or directories left in {out}: {leftovers}"
    for lock_file in (out / LOCKS_DIR).glob("*.lock"):
        handle = try_lock(lock_file)
        assert handle is not None, f"{lock_file} still held after the run"
        release(handle)
    lots = [p for p in out.iterdir() if p.is_dir() and not p.name.startswith(".")]
    manifests = [report.read_manifest(lot) for lot in lots]
    assert all(manifests), "a lot directory without a complete manifest"
    reported = sum(len(_table(lot / report.WAFERS_CSV)) for lot in lots)
    unassigned = len(_table(out / UNASSIGNED_QUARANTINE))
    quarantined = sum(len(_table(lot / QUARANTINE_CSV)) for lot in lots) + unassigned
    assert (reported, quarantined) == (summary.reported, summary.quarantined)
    assert sum(m["counts"]["read"] for m in manifests) + unassigned == summary.read


def assert_quarantined(rows: pd.DataFrame, case: Case, built: Built) -> None:
    assert list(rows.columns) == report.QUARANTINE_COLUMNS
    assert len(rows) == built.bad, rows.to_string()
    assert (rows["reason"].str.len() > 0).all() and (rows["source"].str.len() > 0).all()
    naming = rows[rows["reason"].str.contains(case.problem) & rows["reason"].str.contains(built.shown_name,
                                                                                         regex=False)]
    assert len(naming), f"no quarantine reason matches {case.problem!r} and names {built.shown_name}: {rows}"
    if built.wafer is not None:
        assert naming["reason"].str.contains(f"wafer {built.wafer}", regex=False).any()


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_infer_quarantines_the_bad_input_and_reports_the_rest(case: Case, tmp_path, params, checkpoint):
    built = case.build(tmp_path / "in")
    out = tmp_path / "out"
    summary = infer(built.sources, out, params, model_uri=checkpoint)

    assert (summary.read, summary.reported, summary.quarantined) == (built.good + built.bad, built.good, built.bad)
    assert_quarantined(_quarantine_rows(out, built.quarantine_lot), case, built)
    assert_nothing_lost(out, summary)
    assert not marker_of(tmp_path / "in").exists(), "a pickle in the input was run"


@pytest.mark.parametrize("kind", CLI_CASES)
def test_cli_infer_prints_the_counts(kind: str, tmp_path, checkpoint):
    case = _case(kind)
    built = case.build(tmp_path / "in")
    (tmp_path / "params.yaml").write_text("model: {width: 0.0625}\ntrain: {device: cpu}\n")
    result = CliRunner().invoke(app, ["infer", str(built.sources[0]), "--out", str(tmp_path / "out"),
                                      "--model", checkpoint, "--params", str(tmp_path / "params.yaml")])
    assert result.exit_code == 0, result.output
    expected = f"read {built.good + built.bad} wafers: reported {built.good}, quarantined {built.bad}"
    assert expected in " ".join(result.output.split())
    assert_quarantined(_quarantine_rows(tmp_path / "out", built.quarantine_lot), case, built)


# --- ingest ------------------------------------------------------------------------------------------------


def _strict_error(case: Case, built: Built) -> None:
    """read_wafers, what ingest reads each entry with, refuses the entry naming the file (and wafer)."""
    if case.each_file_reads_alone:
        assert all(io.read_wafers(source) for source in built.sources)
        return
    with pytest.raises(WaferError) as caught:
        io.read_wafers(built.bad_entry)
    message = str(caught.value)
    assert re.search(case.problem, message), message
    assert built.shown_name in message
    if built.wafer is not None:
        assert f"wafer {built.wafer}" in message


@pytest.fixture
def workspace(tmp_path, monkeypatch) -> Path:
    """An ingest workspace; recording the DVC version is stubbed (tests/test_versioning.py runs DVC for real)."""
    monkeypatch.setattr(versioning, "_version_locked",
                        lambda data, message, workspace, expect_md5: versioning.DataVersion("stub", None))
    (tmp_path / "ws").mkdir()
    return tmp_path / "ws"


def _good_entry(root: Path) -> Path:
    io.write_npy_lots(good_wafers("LOT-EXTRA"), root)
    return root / "LOT-EXTRA"


def assert_ingest_lost_nothing(workspace: Path, params, entries: list[Path], result, expected_wafers: int) -> None:
    """Each entry is merged or quarantined with its reason beside it; the store is complete, never half-merged."""
    data = params.data
    assert sorted(result.merged + list(result.quarantined)) == sorted(map(str, entries))
    assert not any(entry.exists() or entry.is_symlink() for entry in entries)
    for entry in result.quarantined:
        reason = workspace / data.quarantine / f"{Path(entry).name}.reason.txt"
        assert reason.read_text().strip() == result.quarantined[entry]
    store = WaferDataset(workspace / data.store)
    assert len(store) == result.wafers_added == expected_wafers
    assert not [p for p in (workspace / data.root).iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_ingest_refuses_the_bad_entry_whole_and_merges_the_others(case: Case, tmp_path, workspace, params):
    built = case.build(tmp_path / "in")
    _strict_error(case, built)
    if not case.labelled:
        pytest.skip("the catalogue's WM-811K files hold unlabelled wafers (no masks, no failureType): ingest "
                    "refuses every entry of them (tested in tests/test_versioning.py)")
    entries = [*built.sources, _good_entry(tmp_path / "extra")]
    good_entries = [e for e in entries if e != built.bad_entry]
    expected = sum(len(io.read_wafers(entry)) for entry in good_entries)

    result = versioning.ingest(params, entries, workspace=workspace)

    assert list(result.quarantined) == [str(built.bad_entry)]
    reason = result.quarantined[str(built.bad_entry)]
    assert re.search(case.ingest_problem or case.problem, reason), reason
    assert built.shown_name in reason
    assert_ingest_lost_nothing(workspace, params, entries, result, expected)
    assert not marker_of(tmp_path / "in").exists(), "a pickle in the input was run"


@pytest.mark.parametrize("kind", ["npy_nan", "dies_duplicate_die.parquet", "dies_empty_csv"])
def test_cli_ingest_names_the_quarantined_entry_and_fails(kind: str, tmp_path, workspace, monkeypatch):
    case = _case(kind)
    built = case.build(tmp_path / "in")
    good = _good_entry(tmp_path / "extra")
    (workspace / "params.yaml").write_text("data: {lock_timeout_s: 5}\n")
    monkeypatch.chdir(workspace)
    result = CliRunner().invoke(app, ["ingest", *map(str, built.sources), str(good), "--params", "params.yaml"])
    assert result.exit_code == 1, result.output
    flat = re.sub(r"\s", "", result.output)
    assert re.sub(r"\s", "", f"quarantined {built.bad_entry}") in flat
    assert "merged" in flat and (workspace / "data" / "labelled" / INDEX_FILE).is_file()


# --- the labelled store is replaced whole or not at all --------------------------------------------------


def test_a_bad_wafer_midway_leaves_no_dataset_and_no_staging(tmp_path, params):
    def wafers_then_bad():
        yield from good_wafers()
        raise WaferError("x.npy", "bad input midway", "LOT", "w")

    from pipeline.dataset import write_dataset

    with pytest.raises(WaferError, match="bad input midway"):
        write_dataset(wafers_then_bad(), tmp_path / "store", params.dataset, seed=0)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_replace_keeps_the_old_dataset(tmp_path, params, monkeypatch):
    """Where the file system cannot swap directories in one step, the store is renamed aside, not deleted,
    before the new one moves in: a failure puts it back."""
    from pipeline import dataset

    dataset.write_dataset(good_wafers("OLD"), tmp_path / "store", params.dataset, seed=0)
    before = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    real_rename = atomic.os.rename

    def rename(source, target):
        if Path(source).name.startswith(".tmp-store-"):
            raise OSError("disk full")
        return real_rename(source, target)

    monkeypatch.setattr(atomic.os, "rename", rename)
    monkeypatch.setattr(atomic, "_exchange", lambda built, target: False)
    with pytest.raises(OSError, match="disk full"):
        dataset.write_dataset(good_wafers("NEW"), tmp_path / "store", params.dataset, seed=0)
    assert {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_the_reliability_doc_quotes_the_catalogue_as_it_is():
    """docs/reliability.md's counts are those of the catalogue these tests run, and every case is distinct."""
    from .catalogue import KINDS

    doc = (PROJECT / "docs" / "reliability.md").read_text()
    quoted = re.search(r"(\d+) kinds of bad input tried \((\d+) cases", doc)
    assert quoted, "docs/reliability.md no longer quotes the catalogue's counts"
    assert (int(quoted[1]), int(quoted[2])) == (len(KINDS), len(CASES))
    assert len(KINDS) <= len(CASES) and len(CASES) == len(set(CASE_IDS))
