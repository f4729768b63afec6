"""Labelled data under DVC, run for real in temporary git repositories: versions, ingest, locks, repro."""

import shutil
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline import io, synth, versioning
from pipeline.dataset import WaferDataset
from pipeline.params import parse_params
from tests.dvc_repo import dvc as _dvc, dvc_repo, git as _git
from tests.nightly_workspace import tiny_project
from pipeline.versioning import (STORE_README, VersioningError, dvc_lock, dvc_md5, ingest, restore_data,
                                 version_data)


pytestmark = pytest.mark.slow  # git and DVC subprocesses


@pytest.fixture
def repo(tmp_path):
    return dvc_repo(tmp_path / "repo", tmp_path / "remote")


def _params(**data):
    return parse_params({"synth": {"wafers_per_lot": 3}, "data": {"lock_timeout_s": 5}, **data})


def _wafers(seed: int, n: int = 6, prefix: str = "LOT"):
    params = _params(synth={"wafers_per_lot": 3, "lot_prefix": prefix})
    return list(synth.generate(params.synth, seed=seed, n=n))


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_add_push_and_checkout_of_an_older_version_restores_it_byte_for_byte(repo):
    params = _params()
    io.write_npy_lots(_wafers(1), repo / "inbox" / "labelled" / "first")
    first = ingest(params, workspace=repo)
    old_files = _files(repo / "data")
    io.write_npy_lots(_wafers(2, prefix="NEW"), repo / "inbox" / "labelled" / "second")
    second = ingest(params, workspace=repo)
    assert second.version.md5 != first.version.md5
    assert _files(repo / "data") != old_files

    log = _git(repo, "log", "--format=%H %s", "--", "data.dvc").splitlines()
    assert [line.split(" ", 1)[0] for line in log] == [second.version.commit, first.version.commit]
    assert all("ingest 6 labelled wafers in 2 lots" in line for line in log)

    shutil.rmtree(repo / ".dvc" / "cache")  # the old version must come back from the remote
    _git(repo, "checkout", first.version.commit, "--", "data.dvc")
    _dvc(repo, "pull", "--force", "data.dvc")
    assert _files(repo / "data") == old_files
    assert dvc_md5(params.data, repo) == first.version.md5


def test_ingest_merges_good_entries_and_quarantines_bad_ones_whole(repo):
    params = _params()
    inbox = repo / "inbox" / "labelled"
    good = _wafers(3)
    io.write_npy_lots(good, inbox / "good_lots")
    io.write_die_table(_wafers(4, prefix="TAB"), inbox / "table.parquet")
    io.write_die_table(good[:1], inbox / "late_clash.csv")  # a wafer the good lots already bring
    io.write_die_table([replace(w, mask=None) for w in _wafers(5, prefix="NOMASK")], inbox / "unlabelled.csv")
    bad = inbox / "bad_lot"
    io.write_npy_lots(_wafers(6, prefix="BAD"), bad)
    np.save(next(bad.rglob("*.mask.npy")), np.full((3, 3), 9, dtype=np.uint8))

    result = ingest(params, workspace=repo)

    assert sorted(Path(m).name for m in result.merged) == ["good_lots", "table.parquet"]
    assert result.wafers_added == 12
    assert set(Path(q).name for q in result.quarantined) == {"late_clash.csv", "unlabelled.csv", "bad_lot"}
    clash = result.quarantined[str(inbox / "late_clash.csv")]
    assert "already in the dataset from" in clash and "good_lots" in clash and "late_clash.csv" in clash
    assert "is not labelled" in result.quarantined[str(inbox / "unlabelled.csv")]
    stored = WaferDataset(repo / params.data.store)
    assert len(stored) == 12 and not stored.index["lot_id"].str.startswith(("BAD", "NOMASK")).any()
    # nothing is lost: each entry is now merged (ingested/) or quarantined, with its reason beside it
    assert not any(inbox.iterdir())
    assert sorted(p.name for p in (repo / "inbox" / "ingested").iterdir()) == ["good_lots", "table.parquet"]
    quarantine = repo / "inbox" / "quarantine"
    assert (quarantine / "bad_lot").is_dir() and "bad_lot" in (quarantine / "bad_lot.reason.txt").read_text()
    assert result.version.md5 == dvc_md5(params.data, repo)


def test_a_lock_held_by_another_process_gives_a_clear_message(repo):
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from pipeline.versioning import dvc_lock
        with dvc_lock(Path({str(repo)!r}), 5):
            print("held", flush=True)
            time.sleep(30)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        params = _params(data={"lock_timeout_s": 0.5})
        with pytest.raises(VersioningError, match=rf"locked by another process \(pid {holder.pid}\); waited 0.5 s"):
            version_data(params.data, "never", repo)
    finally:
        holder.kill()
        holder.wait()
    with dvc_lock(repo, 5):  # released with its holder: the next one gets it at once
        pass


def test_push_to_an_unreachable_remote_fails_clearly_and_the_next_run_pushes(repo, tmp_path):
    params = _params()
    (repo / "data" / "labelled").mkdir(parents=True)
    (repo / "data" / "labelled" / "x.txt").write_text("x")
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    _dvc(repo, "remote", "modify", "local", "url", str(blocker / "remote"))
    with pytest.raises(VersioningError, match="was not pushed to DVC remote 'local'.*The next run pushes it"):
        version_data(params.data, "data: x", repo)
    assert "data: x" in _git(repo, "log", "-1", "--format=%s", "--", "data.dvc")  # recorded locally
    _dvc(repo, "remote", "modify", "local", "url", str(tmp_path / "remote2"))
    version_data(params.data, "data: x", repo)
    assert any((tmp_path / "remote2").rglob("*")), "the retry pushed nothing"


def test_a_fresh_clone_restores_the_empty_store_but_never_invents_a_missing_version(repo, tmp_path):
    params = _params()
    (repo / "data").mkdir()
    (repo / "data" / "README.md").write_text(STORE_README)
    version_data(params.data, "data: start", repo)
    clone = tmp_path / "clone"
    _git(tmp_path, "clone", "-q", str(repo), str(clone))
    _dvc(clone, "remote", "modify", "local", "url", str(tmp_path / "empty-remote"))
    assert restore_data(params.data, clone) == "created"
    assert (clone / "data" / "README.md").read_text() == STORE_README

    (repo / "data" / "README.md").write_text("something else")
    version_data(params.data, "data: changed", repo)
    other = tmp_path / "other"
    _git(tmp_path, "clone", "-q", str(repo), str(other))
    _dvc(other, "remote", "modify", "local", "url", str(tmp_path / "empty-remote"))
    tracked = (other / "data.dvc").read_text()
    with pytest.raises(VersioningError, match="dvc pull"):
        restore_data(params.data, other)
    assert (other / "data.dvc").read_text() == tracked and not (other / "data").exists()


@pytest.fixture(scope="module")
def pipeline_repo(tmp_path_factory):
    """The project's dvc.yaml and a tiny params.yaml in a fresh git work tree, reproduced once."""
    root = tmp_path_factory.mktemp("dvcrepro") / "project"
    params = tiny_project(root)
    params["preview"]["n_wafers"] = 2
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _git(root, "init", "-q")
    _dvc(root, "init", "-q")
    _dvc(root, "remote", "add", "-d", "local", str(root.parent / "remote"))
    restore_data(parse_params(params).data, root)
    _git(root, "add", "-A")
    _git(root, "commit", "-q", "-m", "project")
    first = _dvc(root, "repro")
    return root, first


@pytest.mark.integration
def test_dvc_repro_runs_every_stage_then_does_nothing(pipeline_repo):
    root, first = pipeline_repo
    for stage in ("generate", "split", "train"):
        assert f"Running stage '{stage}'" in first
    metrics = _dvc(root, "metrics", "show", "--json")
    assert '"miou"' in metrics and '"defect_miou"' in metrics
    again = _dvc(root, "repro")
    assert "Running stage" not in again and "Data and pipelines are up to date" in again


@pytest.mark.integration
def test_a_train_param_change_reruns_only_train(pipeline_repo):
    root, _ = pipeline_repo
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["train"]["lr"] = params["train"]["lr"] * 2
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    rerun = _dvc(root, "repro")
    ran = {stage for stage in ("generate", "split", "train") if f"Running stage '{stage}'" in rerun}
    assert ran == {"train"}


def test_a_hung_dvc_command_is_stopped_with_a_clear_error(tmp_path, monkeypatch):
    """A `dvc push` to a remote that never answers must not hold the DVC and nightly locks for ever."""
    hanging = tmp_path / "hanging-python"
    hanging.write_text("#!/bin/sh\nexec sleep 60\n")
    hanging.chmod(0o755)
    monkeypatch.setattr(versioning.sys, "executable", str(hanging))
    with pytest.raises(versioning.VersioningError,
                       match=r"`hanging-python -m dvc push --quiet` in .* did not finish within 0.5 s and was stopped"):
        versioning._dvc(tmp_path, "push", "--quiet", command_timeout_s=0.5)


class Killed(BaseException):
    """What a kill -9 leaves: the ingest stops at this line, nothing after it runs."""


@pytest.mark.parametrize("stop_at", ["_move_ingested", "_version_locked"])
def test_an_ingest_killed_midway_is_finished_by_the_next_one(repo, monkeypatch, stop_at):
    """Killed after the store is rewritten but before its entries move out of the inbox, or before data/ is
    versioned: the next ingest (with nothing new) moves them out, versions data/ and pushes it."""
    params = _params()
    inbox = repo / "inbox" / "labelled"
    io.write_npy_lots(_wafers(3), inbox / "lots")
    real = getattr(versioning, stop_at)

    def kill(*args, **kwargs):
        raise Killed

    monkeypatch.setattr(versioning, stop_at, kill)
    with pytest.raises(Killed):
        ingest(params, workspace=repo)
    monkeypatch.setattr(versioning, stop_at, real)
    assert len(WaferDataset(repo / params.data.store)) == 6  # the store changed, unversioned
    before = dvc_md5(params.data, repo)

    result = ingest(params, workspace=repo)

    assert result.quarantined == {}, "the merged entry was refused as a duplicate of itself"
    assert not (inbox / "lots").exists() and (repo / "inbox" / "ingested" / "lots").is_dir()
    assert result.version is not None and result.version.md5 == dvc_md5(params.data, repo) != before
    assert _dvc(repo, "status", "-c", "-q", "data.dvc").strip() == "", "the version was not pushed"
    assert not (repo / versioning.PENDING_FILE).exists()


def test_an_ingest_killed_before_the_store_changed_leaves_its_entries_to_be_merged(repo, monkeypatch):
    params = _params()
    inbox = repo / "inbox" / "labelled"
    io.write_npy_lots(_wafers(3), inbox / "lots")

    def kill(*args, **kwargs):
        raise Killed

    monkeypatch.setattr(versioning, "write_dataset", kill)
    with pytest.raises(Killed):
        ingest(params, workspace=repo)
    monkeypatch.undo()
    result = ingest(params, workspace=repo)
    assert result.wafers_added == 6 and result.quarantined == {}
    assert len(WaferDataset(repo / params.data.store)) == 6


def test_a_failed_push_is_retried_by_the_next_ingest_even_with_an_empty_inbox(repo, tmp_path):
    params = _params()
    io.write_npy_lots(_wafers(3), repo / "inbox" / "labelled" / "lots")
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    _dvc(repo, "remote", "modify", "local", "url", str(blocker / "remote"))
    with pytest.raises(VersioningError, match="was not pushed"):
        ingest(params, workspace=repo)
    _dvc(repo, "remote", "modify", "local", "url", str(tmp_path / "remote2"))
    result = ingest(params, workspace=repo)
    assert result.wafers_added == 0 and result.version is not None
    assert _dvc(repo, "status", "-c", "-q", "data.dvc").strip() == "", "the retry pushed nothing"
