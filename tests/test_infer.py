"""Batch inference end to end: every source kind, quarantine, skip/--force, crash safety, the CLI."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from pipeline import io, report, synth
from pipeline.cli import app
from pipeline import infer as infer_module
from pipeline.infer import infer
from pipeline.model import build_model
from pipeline.params import Params, parse_params
from pipeline.checkpoint import save_checkpoint
from pipeline.train import TrainState
from pipeline.wafer import validate_wafer

WM811K = Path(__file__).resolve().parents[1] / "real_data" / "wm811k"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A thin untrained FCN-8s saved as a training checkpoint, params pointing at it, and 4 synthetic lots."""
    root = tmp_path_factory.mktemp("infer")
    params = parse_params({"model": {"width": 0.0625}, "synth": {"wafers_per_lot": 3},
                           "infer": {"chunk_wafers": 4, "batch_wafers": 4, "min_pattern_dies": 3},
                           "train": {"device": "cpu"}})
    torch.manual_seed(0)
    model = build_model(params.model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    checkpoint = root / "model.pt"
    save_checkpoint(checkpoint, model, optimizer, scheduler, TrainState(), params)
    wafers = list(synth.generate(params.synth, seed=1, n=12))
    return root, params, str(checkpoint), wafers


def _run(params: Params, source: Path, out: Path, model: str, force: bool = False, named: bool = False):
    summary = infer(source, out, params, model_uri=model, force=force, named=named)
    assert summary.read == summary.reported + summary.quarantined + summary.skipped
    return summary


def _lots(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.is_dir() and not p.name.startswith("."))


def test_lot_directory_and_tree_of_lots(setup, tmp_path):
    root, params, model, wafers = setup
    io.write_npy_lots(wafers, tmp_path / "inbox")
    first_lot = wafers[0].lot_id
    one = _run(params, tmp_path / "inbox" / first_lot, tmp_path / "one", model)
    assert (one.read, one.reported, one.quarantined) == (3, 3, 0)
    assert _lots(tmp_path / "one") == [first_lot]
    tree = _run(params, tmp_path / "inbox", tmp_path / "all", model)
    assert (tree.read, tree.reported, tree.lots_reported) == (12, 12, 4)
    lot = tmp_path / "all" / first_lot
    table = pd.read_parquet(lot / "wafers.parquet")
    assert list(table.columns) == report.WAFER_COLUMNS
    assert table["model_version"].str.startswith("checkpoint:model.pt:").all()
    mask = np.load(lot / "masks" / f"{wafers[0].wafer_id}.npy")
    assert mask.dtype == np.uint8 and mask.shape == wafers[0].shape
    assert not mask[wafers[0].map != 2].any()  # passing and off-wafer dies are background
    assert (tmp_path / "all" / "index.html").read_text().count("report.html") >= 4


@pytest.mark.slow
def test_die_tables_and_wm811k_files(setup, tmp_path):
    root, params, model, wafers = setup
    for name in ("dies.parquet", "dies.csv"):
        io.write_die_table(wafers, tmp_path / name)
        summary = _run(params, tmp_path / name, tmp_path / f"out-{name}", model)
        assert (summary.read, summary.reported, summary.lots_reported) == (12, 12, 4)
    summary = _run(params, WM811K / "sub100.csv", tmp_path / "out-wm811k", model)
    assert (summary.read, summary.reported, summary.quarantined) == (100, 100, 0)
    numbered = [w for w in wafers]
    renumbered = [validate_wafer(w.lot_id, str(i + 1), w.map, label="none") for i, w in enumerate(numbered)]
    io.write_wm811k_pickle(renumbered, tmp_path / "LSWMD.pkl")
    summary = _run(params, tmp_path / "LSWMD.pkl", tmp_path / "out-pkl", model, named=True)
    assert (summary.read, summary.reported) == (12, 12)
    unnamed = _run(params, tmp_path / "LSWMD.pkl", tmp_path / "out-inbox", model)  # as an inbox entry
    assert (unnamed.read, unnamed.reported, unnamed.quarantined) == (1, 0, 1)


def test_every_bad_input_is_quarantined_with_its_reason(setup, tmp_path):
    root, params, model, wafers = setup
    inbox = tmp_path / "inbox"
    io.write_npy_lots(wafers[:3], inbox)
    lot = inbox / wafers[0].lot_id
    np.save(lot / "bad-values.npy", np.full((5, 5), 3, np.uint8))
    np.save(lot / "floats.npy", np.ones((5, 5), np.float32))
    (lot / "truncated.npy").write_bytes((lot / f"{wafers[0].wafer_id}.npy").read_bytes()[:60])
    (lot / "notes.txt").write_text("not a wafer")
    (lot / "evil.pkl").write_bytes(b"not opened")
    summary = _run(params, inbox, tmp_path / "out", model)
    assert (summary.read, summary.reported, summary.quarantined) == (8, 3, 5)
    quarantine = pd.read_csv(tmp_path / "out" / wafers[0].lot_id / "quarantine.csv")
    reasons = " | ".join(quarantine["reason"])
    assert list(quarantine.columns) == report.QUARANTINE_COLUMNS
    for expected in ("outside {0, 1, 2}", "integer dtype", "not a wafer file", "named explicitly"):
        assert expected in reasons
    assert len(quarantine) == 5


def test_bad_rows_of_a_die_table_are_quarantined(setup, tmp_path):
    root, params, model, wafers = setup
    io.write_die_table(wafers[:6], tmp_path / "dies.parquet")
    table = pd.read_parquet(tmp_path / "dies.parquet")
    bad_bin = table["wafer_id"] == wafers[0].wafer_id
    table.loc[bad_bin & (table["lot_id"] == wafers[0].lot_id), "bin"] = 7
    table.loc[table["lot_id"] == wafers[3].lot_id, "lot_id"] = "../escape"
    table.to_parquet(tmp_path / "bad.parquet", index=False)
    summary = _run(params, tmp_path / "bad.parquet", tmp_path / "out", model)
    assert (summary.read, summary.reported, summary.quarantined) == (6, 2, 4)
    lot_quarantine = pd.read_csv(tmp_path / "out" / wafers[0].lot_id / "quarantine.csv")
    assert "bin" in lot_quarantine["reason"].iloc[0]
    unassigned = pd.read_csv(tmp_path / "out" / "quarantine.csv")
    assert len(unassigned) == 3 and unassigned["reason"].str.contains("escape").all()
    assert "../escape" not in _lots(tmp_path / "out")


def test_current_lots_are_skipped_unless_forced(setup, tmp_path):
    root, params, model, wafers = setup
    io.write_die_table(wafers, tmp_path / "dies.parquet")
    _run(params, tmp_path / "dies.parquet", tmp_path / "out", model)
    stamp = (tmp_path / "out" / wafers[0].lot_id / "manifest.json").stat().st_mtime_ns
    again = _run(params, tmp_path / "dies.parquet", tmp_path / "out", model)
    assert (again.reported, again.skipped, again.lots_skipped) == (0, 12, 4)
    assert (tmp_path / "out" / wafers[0].lot_id / "manifest.json").stat().st_mtime_ns == stamp
    forced = _run(params, tmp_path / "dies.parquet", tmp_path / "out", model, force=True)
    assert (forced.reported, forced.skipped) == (12, 0)


def test_a_lot_whose_inputs_changed_is_reported_again(setup, tmp_path):
    """A lot read while its producer was still copying it is re-reported once the rest has arrived."""
    root, params, model, wafers = setup
    lot = wafers[0].lot_id
    of_lot = [w for w in wafers if w.lot_id == lot]
    io.write_npy_lots(of_lot[:-1], tmp_path / "inbox")
    _run(params, tmp_path / "inbox", tmp_path / "out", model)
    io.write_npy_lots(of_lot[-1:], tmp_path / "inbox")  # the last wafer lands after the first run
    again = _run(params, tmp_path / "inbox", tmp_path / "out", model)
    assert (again.reported, again.lots_reported) == (len(of_lot), 1)
    assert len(pd.read_csv(tmp_path / "out" / lot / "wafers.csv")) == len(of_lot)
    assert _run(params, tmp_path / "inbox", tmp_path / "out", model).lots_reported == 0


def test_a_crash_mid_run_leaves_no_complete_looking_report(setup, tmp_path, monkeypatch):
    root, params, model, wafers = setup
    io.write_die_table(wafers, tmp_path / "dies.parquet")
    real_write = report.write_durably
    calls = []

    def crash_on_third_lot(directory, files):
        calls.append(json.loads(files[report.MANIFEST_FILE])["lot_id"])
        if len(calls) == 3:
            (directory / "wafers.csv").write_text("half")
            raise RuntimeError("power cut")
        return real_write(directory, files)

    monkeypatch.setattr(report, "write_durably", crash_on_third_lot)
    with pytest.raises(RuntimeError, match="power cut"):
        infer(tmp_path / "dies.parquet", tmp_path / "out", params, model_uri=model)
    out = tmp_path / "out"
    done = [lot for lot in _lots(out) if report.read_manifest(out / lot)]
    assert done == _lots(out) and calls[2] not in done
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp")]


def test_cli_prints_read_reported_and_quarantined(setup, tmp_path):
    root, params, model, wafers = setup
    io.write_npy_lots(wafers[:3], tmp_path / "inbox")
    np.save(tmp_path / "inbox" / wafers[0].lot_id / "bad.npy", np.zeros((4, 4), np.uint8))
    (tmp_path / "params.yaml").write_text(
        "model: {width: 0.0625}\ntrain: {device: cpu}\n")
    result = CliRunner().invoke(app, ["infer", str(tmp_path / "inbox"), "--out", str(tmp_path / "out"),
                                      "--model", model, "--params", str(tmp_path / "params.yaml")])
    assert result.exit_code == 0, result.output
    assert "read 4 wafers: reported 3, quarantined 1" in " ".join(result.output.split())


def test_a_wafer_table_without_lot_ids_is_reported_in_lots_of_the_configured_size(setup, tmp_path):
    root, params, model, _ = setup
    table = pq.read_table(WM811K / "wm811k_labelled.parquet").slice(0, 7).drop_columns(["failure_type"])
    pq.write_table(table, tmp_path / "night.parquet")
    sized = params.model_copy(update={"infer": params.infer.model_copy(update={"wafer_table_lot_wafers": 3})})
    summary = _run(sized, tmp_path / "night.parquet", tmp_path / "out", model)
    assert (summary.read, summary.reported, summary.lots_reported) == (7, 7, 3)
    assert _lots(tmp_path / "out") == ["night-00000", "night-00001", "night-00002"]
    wafers = pd.read_csv(tmp_path / "out" / "night-00002" / "wafers.csv", dtype=str)
    assert wafers["wafer_id"].tolist() == [table["wafer_id"][6].as_py()]


def test_the_class_mix_counts_complete_reports_only(setup, tmp_path):
    """Another run's half-built lot (`OUT/.tmp-<lot>-xxxxxxxx/`) is neither counted nor read: it can vanish."""
    root, params, model, wafers = setup
    io.write_npy_lots(wafers, tmp_path / "inbox")
    out = tmp_path / "out"
    summary = _run(params, tmp_path / "inbox", out, model)
    first_lot = wafers[0].lot_id
    building = out / f".tmp-{first_lot}-abcdefgh"
    building.mkdir()
    (out / first_lot / "wafers.csv").replace(building / "wafers.csv")  # also: lot 1's report is now incomplete
    counts = infer_module.lot_pattern_counts(out)
    assert sorted(counts.index) == sorted({w.lot_id for w in wafers} - {first_lot})
    assert counts["wafers"].sum() == summary.reported - 3


def test_the_model_runs_single_threaded_streams_one_per_core_and_gives_torchs_threads_back():
    import os

    import torch

    from pipeline.infer import model_streams

    torch.set_num_threads(2)
    before = torch.get_num_threads()
    with model_streams(None, torch.device("cpu")) as streams:
        assert streams == len(os.sched_getaffinity(0))
        assert torch.get_num_threads() == 1
    with model_streams(3, torch.device("cpu")) as streams:
        assert streams == 3 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    first, second = model_streams(1, torch.device("cpu")), model_streams(1, torch.device("cpu"))
    first.__enter__(), second.__enter__()  # two runs in threads of one process, the first ends first
    first.__exit__(None, None, None)
    assert torch.get_num_threads() == 1
    second.__exit__(None, None, None)
    assert torch.get_num_threads() == before


def test_streams_predict_what_one_stream_predicts_in_the_same_order():
    import numpy as np
    import torch

    from pipeline.model import FCN
    from pipeline.params import Params
    from pipeline.predict import predict_wafers
    from pipeline.synth import generate

    torch.manual_seed(0)
    model = FCN("fcn8s", 0.0625).eval()
    wafers = list(generate(Params().synth, seed=5, n=40))  # two lots of two sizes: two buckets of 5 batches
    one = predict_wafers(model, wafers, 4, torch.device("cpu"))
    three = predict_wafers(model, wafers, 4, torch.device("cpu"), streams=3)
    assert all(a.shape == w.shape for a, w in zip(three, wafers))
    assert all(np.array_equal(a, b) for a, b in zip(one, three))
