"""Faults: a process SIGKILLed mid-training or mid-inference, a locked MLflow database, a full disk."""

from __future__ import annotations

import errno
import json
import os
import signal
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch

from pipeline import registry, report, synth
from pipeline.dataset import WaferDataset, write_dataset
from pipeline.infer import infer
from pipeline.io import write_npy_lots
from pipeline.params import Params, parse_params
from pipeline.report import ReportWriteError
from pipeline.train import fit

from .catalogue import good_wafer
from .workloads import lots_inbox, python_child

pytestmark = pytest.mark.slow  # processes killed mid-training and mid-inference

READY = "epoch-1-done"
CHILD_TIMEOUT_S = 300


def _wait_for(condition, what: str, process: subprocess.Popen, timeout_s: float = CHILD_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"the child exited ({process.returncode}) before {what}: {process.stderr.read()}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


# --- SIGKILL during training -----------------------------------------------------------------------------

TRAIN_CHILD = """
import sys
from pathlib import Path
from pipeline.dataset import WaferDataset
from pipeline.params import Params
from pipeline.train import fit
params = Params.model_validate_json(Path(sys.argv[1]).read_text())
def mark(epoch, record):
    if epoch == 1:
        Path(sys.argv[2]).touch()
fit(params, WaferDataset(params.dataset.dir), on_epoch=mark)
"""


@pytest.fixture(scope="module")
def small_training(tmp_path_factory) -> tuple[Path, Params]:
    root = tmp_path_factory.mktemp("faults-train")
    params = parse_params({
        "seed": 3, "synth": {"wafers_per_lot": 10}, "dataset": {"dir": str(root / "data")},
        "model": {"width": 0.0625, "dropout": 0.1},
        "train": {"epochs": 6, "batch_wafers": 16, "lr": 0.003, "device": "cpu", "early_stop_patience": 10},
    })
    write_dataset(synth.generate(params.synth, seed=params.seed, n=240, shape=(32, 32)), params.dataset.dir,
                  params.dataset, params.seed)
    return root, params


def _in(params: Params, checkpoint_dir: Path) -> Params:
    data = params.model_dump(mode="json")
    data["train"]["checkpoint_dir"] = str(checkpoint_dir)
    return Params.model_validate(data)


def test_sigkill_mid_training_then_resume_reaches_the_uninterrupted_weights(small_training):
    root, params = small_training
    dataset = WaferDataset(params.dataset.dir)
    straight = fit(_in(params, root / "straight"), dataset)

    killed = _in(params, root / "killed")
    (root / "params.json").write_text(killed.model_dump_json())
    child = python_child(TRAIN_CHILD, str(root / "params.json"), str(root / READY))
    _wait_for((root / READY).exists, "epoch 1", child)
    child.send_signal(signal.SIGKILL)  # in epoch 2 (or, on a slow poll, a little later: never past epoch 5)
    assert child.wait() == -signal.SIGKILL
    left = torch.load(killed.train.checkpoint_dir / "last.pt", weights_only=True)["state"]["epoch"]
    assert 1 <= left < params.train.epochs, "the kill did not interrupt training"

    resumed = fit(killed, dataset, resume=True)
    assert resumed.state.epoch == params.train.epochs
    assert [h["train_loss"] for h in resumed.state.history] == [h["train_loss"] for h in straight.state.history]
    for name, weight in straight.model.state_dict().items():
        assert torch.equal(weight, resumed.model.state_dict()[name]), name


# --- SIGKILL during inference ----------------------------------------------------------------------------

INFER_CHILD = """
import sys
from pathlib import Path
from pipeline.infer import infer
from pipeline.params import Params
params = Params.model_validate_json(Path(sys.argv[1]).read_text())
infer(Path(sys.argv[2]), Path(sys.argv[3]), params, model_uri=sys.argv[4])
"""
N_LOTS = 24


def _report_content(out: Path) -> dict[str, bytes | dict]:
    """Every file of every lot report, the manifests without their timestamp, the pages without theirs."""
    content: dict[str, bytes | dict] = {}
    for path in sorted(out.glob("*/**/*")):
        if not path.is_file() or path.relative_to(out).parts[0].startswith("."):
            continue
        key = path.relative_to(out).as_posix()
        if path.name == report.MANIFEST_FILE:
            manifest = json.loads(path.read_text())  # file hashes: the pages' differ by their timestamp
            content[key] = {**{k: v for k, v in manifest.items() if k != "generated_at"}, "files": sorted(manifest["files"])}
        elif path.suffix == ".html":
            content[key] = b"\n".join(line for line in path.read_bytes().splitlines() if b"Generated" not in line)
        else:
            content[key] = path.read_bytes()
    return content


def test_sigkill_mid_inference_then_a_rerun_gives_the_clean_reports(tmp_path, params, checkpoint):
    params = params.model_copy(update={"infer": params.infer.model_copy(update={"chunk_wafers": 4})})
    inbox = lots_inbox(tmp_path, N_LOTS, per_lot=4)
    clean = infer(inbox, tmp_path / "clean", params, model_uri=checkpoint)
    assert clean.lots_reported == N_LOTS

    out = tmp_path / "out"
    (tmp_path / "params.json").write_text(params.model_dump_json())
    child = python_child(INFER_CHILD, str(tmp_path / "params.json"), str(inbox), str(out), checkpoint)
    _wait_for(lambda: len(list(out.glob(f"*/{report.MANIFEST_FILE}"))) >= 2, "two lot reports", child)
    child.send_signal(signal.SIGKILL)
    assert child.wait() == -signal.SIGKILL
    done_before = len(list(out.glob(f"*/{report.MANIFEST_FILE}")))
    assert done_before < N_LOTS, "the kill did not interrupt inference"
    assert all(report.read_manifest(lot) for lot in out.iterdir() if lot.is_dir() and not lot.name.startswith("."))

    rerun = infer(inbox, out, params, model_uri=checkpoint)
    assert rerun.lots_reported + rerun.lots_skipped == N_LOTS
    assert rerun.lots_skipped >= done_before - 1  # a lot renamed into place just before the kill may count too
    assert rerun.read == rerun.reported + rerun.quarantined + rerun.skipped
    assert _report_content(out) == _report_content(tmp_path / "clean")
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [".locks"]  # no stale builds


# --- MLflow database locked by another writer -------------------------------------------------------------


def _lock_database(db: Path, seconds: float) -> threading.Thread:
    """Another writer: an exclusive SQLite transaction on the tracking DB, held for `seconds`."""
    locked = threading.Event()

    def hold() -> None:
        connection = sqlite3.connect(db, isolation_level=None)
        connection.execute("BEGIN EXCLUSIVE")
        locked.set()
        time.sleep(seconds)
        connection.execute("ROLLBACK")
        connection.close()

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    locked.wait(10)
    return thread


@pytest.fixture
def tracking(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    db = tmp_path / "mlflow.db"
    reg = parse_params({"registry": {"tracking_uri": f"sqlite:///{db}", "artifact_dir": str(tmp_path / "art"),
                                     "lock_retries": 1, "lock_backoff_s": 0.5}}).registry
    registry.configure(reg)  # creates the DB before any other writer
    return db, reg


def test_a_locked_mlflow_database_is_retried_until_the_writer_lets_go(tracking, caplog):
    db, reg = tracking
    writer = _lock_database(db, seconds=6)  # longer than SQLite's own 5 s wait: the first try fails
    assert registry.current_champion(reg.model_name) is None
    writer.join()
    assert "MLflow database locked by another writer; retry 1/1" in caplog.text


def test_a_mlflow_database_that_stays_locked_gives_a_clear_error(tracking):
    db, reg = tracking
    writer = _lock_database(db, seconds=14)
    with pytest.raises(registry.RegistryError, match=r"stayed locked by another writer through 2 tries"):
        registry.current_champion(reg.model_name)
    writer.join()


def test_a_training_runs_tracking_calls_wait_out_a_locked_database(tracking):
    """start_run and per-epoch log_metrics survive a lock held past SQLite's own 5-s wait (MLflow 3 waits
    these out itself; registry's wrappers retry beyond that like every registry call)."""
    import mlflow

    db, reg = tracking
    writer = _lock_database(db, seconds=7)
    run = registry.start_run()
    try:
        writer.join()
        writer = _lock_database(db, seconds=7)
        registry.log_metrics({"train_loss": 0.5}, step=1)
        writer.join()
        assert mlflow.MlflowClient().get_run(run.info.run_id).data.metrics["train_loss"] == 0.5
    finally:
        mlflow.end_run()


def test_registering_a_runs_model_again_reuses_its_version(tracking, params):
    """A retried registration (after a locked database) must not register the run's model twice."""
    import mlflow

    from pipeline.model import build_model

    db, reg = tracking
    with mlflow.start_run() as run:
        info = registry.log_model(build_model(params.model), good_wafer("L", "w").map[None])
        first = registry.register_run_model(info.model_uri, run.info.run_id, reg.model_name)
        again = registry.register_run_model(info.model_uri, run.info.run_id, reg.model_name)
    versions = mlflow.MlflowClient().search_model_versions(f"name='{reg.model_name}'")
    assert first == again == "1" and len(versions) == 1


# --- disk full --------------------------------------------------------------------------------------------


def test_disk_full_mid_report_is_a_clear_error_and_the_previous_reports_stay(tmp_path, params, checkpoint,
                                                                             monkeypatch):
    inbox = tmp_path / "inbox"
    write_npy_lots([good_wafer(lot, f"w{i}", seed=i) for lot in ("A", "B") for i in range(3)], inbox)
    out = tmp_path / "out"
    infer(inbox, out, params, model_uri=checkpoint)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and ".locks" not in p.parts}

    def full_disk(path, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(report, "_write_synced", full_disk)  # every file write of a lot report fails
    with pytest.raises(ReportWriteError, match=r"/out/A: report not written \(No space left on device\); "
                                               r"the previous report is kept"):
        infer(inbox, out, params, model_uri=checkpoint, force=True)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and ".locks" not in p.parts} == before


def test_a_failure_in_prediction_leaves_no_lot_locked(tmp_path, params, checkpoint, monkeypatch):
    """The lots claimed for a chunk are released when prediction fails, not only by the report writer (a
    long-lived worker would otherwise hold them until its process ends)."""
    from pipeline import infer as infer_module

    inbox = tmp_path / "inbox"
    write_npy_lots([good_wafer(lot, "w0") for lot in ("A", "B")], inbox)
    claimed = []

    def claim(out, lot_id):
        claimed.append(handle := infer_module.try_lock(out / infer_module.LOCKS_DIR / f"{lot_id}.lock"))
        return handle

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory in the model")

    monkeypatch.setattr(infer_module, "claim_lot", claim)
    monkeypatch.setattr(infer_module, "predict_wafers", broken)
    with pytest.raises(RuntimeError, match="out of memory in the model"):
        infer(inbox, tmp_path / "out", params, model_uri=checkpoint)
    assert len(claimed) == 2 and all(handle.closed for handle in claimed), "a lot lock is still held"


# --- a writer killed mid-replace ----------------------------------------------------------------------------


def test_replacing_a_directory_swaps_it_in_one_step_and_leaves_nothing_aside(tmp_path, monkeypatch):
    from pipeline import atomic

    target = tmp_path / "store"
    target.mkdir()
    (target / "old").write_text("old")
    built = atomic.staging_directory(target)
    (built / "new").write_text("new")
    swaps = []
    exchange = atomic._exchange
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: swaps.append((a, b)) or exchange(a, b))
    atomic.replace_directory(built, target)
    assert swaps == [(built, target)]
    assert [p.name for p in target.iterdir()] == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]


def test_a_store_left_aside_by_a_killed_ingest_is_put_back_before_the_next_ingest(tmp_path, params, monkeypatch):
    """Without renameat2 the swap is two renames; a kill between them leaves no store, its old copy aside and
    a staging directory inside data/. The next ingest must restore the store (not write one of only the new
    entries) and clear the leftovers (or `dvc add data` would version them)."""
    from pipeline import atomic, versioning
    from pipeline.dataset import WaferDataset

    monkeypatch.setattr(versioning, "_version_locked",
                        lambda data, message, workspace, expect_md5: versioning.DataVersion("stub", None))
    workspace = tmp_path / "ws"
    first = tmp_path / "first"
    write_npy_lots([good_wafer("LOT-1", f"w{i}", seed=i) for i in range(3)], first)
    versioning.ingest(params, [first / "LOT-1"], workspace=workspace)
    store = workspace / params.data.store
    store.rename(store.parent / f"{atomic.ASIDE_PREFIX}{store.name}-deadbeef")  # what the kill left
    atomic.staging_directory(store)  # and a half-built staging directory

    second = tmp_path / "second"
    write_npy_lots([good_wafer("LOT-2", "w0")], second)
    result = versioning.ingest(params, [second / "LOT-2"], workspace=workspace)

    assert result.wafers_added == 1 and len(WaferDataset(store)) == 4
    assert sorted(p.name for p in store.parent.iterdir()) == [store.name]


def test_a_lot_report_left_aside_by_a_killed_writer_is_put_back_and_the_leftovers_cleared(tmp_path, params,
                                                                                          checkpoint):
    """A kill between the two renames of a lot's replace leaves no report, its old copy aside and a staging
    directory. The next run lists OUT once a chunk for such leftovers: it restores the old copy (current, so
    not reported again) and removes the staging directory, and leaves other lots' names alone."""
    from pipeline import atomic

    inbox = tmp_path / "inbox"
    write_npy_lots([good_wafer(lot, f"w{i}", seed=i) for lot in ("A", "A-2", "B") for i in range(2)], inbox)
    out = tmp_path / "out"
    infer(inbox, out, params, model_uri=checkpoint)
    (out / "A").rename(out / f"{atomic.ASIDE_PREFIX}A-deadbeef")
    atomic.staging_directory(out / "A")
    assert atomic.targets_with_leftovers(out) == {"A"}

    again = infer(inbox, out, params, model_uri=checkpoint)
    assert (again.lots_reported, again.lots_skipped) == (0, 3)
    assert atomic.targets_with_leftovers(out) == set()
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".locks")) == [
        "A", "A-2", "B", "index.html", "quarantine.csv"]
