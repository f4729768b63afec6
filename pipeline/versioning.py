"""Labelled data as versioned code: `data/` is tracked by `data.dvc`; every change is `dvc add`ed, pushed to
the DVC remote and, inside a git work tree, committed with a message naming the change.

DVC runs as its own CLI process (`python -m dvc`), one at a time per workspace: `dvc_lock` queues this
project's DVC work behind a file lock and turns DVC's own lock and remote errors into plain messages.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pipeline.atomic import atomic_file, recover_directory
from pipeline.dataset import INDEX_FILE, WaferDataset, write_dataset
from pipeline.io import Rejected, iter_source
from pipeline.locks import LockHeld, hold_lock
from pipeline.params import DataParams, Params, RealParams
from pipeline.wafer import Wafer, WaferError

log = logging.getLogger(__name__)

CHUNK = 1 << 20
LOCK_FILE = Path(".dvc/tmp/waferseg-dvc.lock")
PENDING_FILE = Path(".dvc/tmp/waferseg-pending-version.json")  # an ingest's version, recorded before the store changes
DVC_BUSY = "Unable to acquire lock"
GIT_TIMEOUT_S = 120  # git work here is local (status, add, commit of data.dvc)
GIT_IDENTITY = ("-c", "user.name=waferseg", "-c", "user.email=waferseg@localhost")
# What `data/` holds before any real labelled data arrives: the same bytes everywhere, so a fresh clone
# rebuilds the version data.dvc names without a remote.
STORE_README = """\
Labelled real wafers, versioned with DVC (data.dvc at the project root tracks this directory).

Do not edit by hand: drop labelled die tables (with a `label` column) or lots of <wafer_id>.npy plus
<wafer_id>.mask.npy into the labelled inbox (params.yaml `data.inbox`) and run `waferseg ingest`.
It validates them, merges them into labelled/ and versions the result (dvc add, dvc push, git commit).
"""


class VersioningError(RuntimeError):
    """A DVC or git step failed; the message says which, why, and what to do."""


@dataclass(frozen=True)
class DataVersion:
    md5: str
    commit: str | None  # the git commit that recorded this version, None when nothing changed / no git


def dataset_version(root: Path | str) -> str:
    """sha256 over every file's relative path and bytes, in sorted order; first 16 hex digits."""
    root = Path(root)
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        with path.open("rb") as handle:
            while chunk := handle.read(CHUNK):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def training_set_version(dataset_dir: Path | str, real: RealParams) -> str:
    """What a model is trained on: the training dataset's content hash and every shipped real set with its
    recorded split, hashed together; first 16 hex digits."""
    digest = hashlib.sha256(dataset_version(dataset_dir).encode())
    for name, real_set in sorted(real.sets.items()):
        for path in (real_set.path, real.splits_dir / f"{name}.csv"):
            digest.update(f"\0{name}\0".encode())
            with Path(path).open("rb") as handle:
                while chunk := handle.read(CHUNK):
                    digest.update(chunk)
    return digest.hexdigest()[:16]


def dvc_file(params: DataParams, workspace: Path = Path(".")) -> Path:
    return workspace / f"{params.root}.dvc"


def dvc_md5(params: DataParams, workspace: Path = Path(".")) -> str | None:
    """The md5 data.dvc records for data/ (DVC's own dataset version), None when it is not tracked yet."""
    path = dvc_file(params, workspace)
    if not path.is_file():
        return None
    try:
        return yaml.safe_load(path.read_text())["outs"][0]["md5"]
    except (yaml.YAMLError, KeyError, IndexError, TypeError) as error:
        raise VersioningError(f"{path}: not a DVC file with an output md5 ({error})") from None


@contextmanager
def dvc_lock(workspace: Path, timeout_s: float) -> Iterator[None]:
    """Hold the workspace's DVC lock; wait up to timeout_s for another process to finish its DVC work."""
    try:
        with hold_lock(workspace / LOCK_FILE, timeout_s):
            yield
    except LockHeld as held:
        raise VersioningError(
            f"{workspace.resolve()}: DVC work is locked by another process ({held.holder}); waited "
            f"{timeout_s:g} s. Let it finish (or stop it) and run again.") from None


def _run_command(command: list[str], workspace: Path, timeout_s: float) -> subprocess.CompletedProcess:
    """One dvc or git command, killed after timeout_s: a hung `dvc push` must not hold the locks for ever."""
    try:
        return subprocess.run(command, cwd=workspace, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        shown = " ".join(Path(command[0]).name if i == 0 else part for i, part in enumerate(command))
        raise VersioningError(f"`{shown}` in {workspace.resolve()} did not finish within {timeout_s:g} s and was "
                              "stopped (data.command_timeout_s); check the remote and run again") from None


def _dvc(workspace: Path, *args: str, timeout_s: float = 0.0, command_timeout_s: float = 900.0) -> str:
    """Run one DVC command; retry while another DVC process (a `dvc repro`, say) holds DVC's own lock."""
    deadline = time.monotonic() + timeout_s
    delay = 0.5
    while True:
        done = _run_command([sys.executable, "-m", "dvc", *args], workspace, command_timeout_s)
        if done.returncode == 0:
            return done.stdout
        output = f"{done.stdout}\n{done.stderr}".strip()
        if DVC_BUSY in output and time.monotonic() < deadline:
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
            continue
        if DVC_BUSY in output:
            raise VersioningError(f"{workspace.resolve()}: another DVC process holds the repository lock "
                                  f"(`dvc {args[0]}` gave up after {timeout_s:g} s); let it finish and run again")
        raise VersioningError(f"`dvc {' '.join(args)}` failed in {workspace.resolve()}: {_last_lines(output)}")


PIPELINE_LOCK = Path("dvc.lock")


def _locked_stages(workspace: Path) -> dict:
    path = workspace / PIPELINE_LOCK
    return (yaml.safe_load(path.read_text()) or {}).get("stages", {}) if path.is_file() else {}


def reproduce(params: DataParams, timeout_s: float, force: Sequence[str] = (), workspace: Path = Path(".")
              ) -> list[str]:
    """`dvc repro` of the workspace's dvc.yaml under its DVC lock: DVC runs the stale stages and only those,
    and records each in dvc.lock. Stages named in `force` run even when up to date (`dvc repro -f -s`).
    Returns the stages whose dvc.lock entry changed. DVC's and the stages' output goes to this process's console as it comes; a
    run past timeout_s is stopped with its stage commands."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    commands = [["repro"]] + [["repro", "--force", "--single-item", stage] for stage in force]
    with dvc_lock(workspace, params.lock_timeout_s):
        before = _locked_stages(workspace)
        for args in commands:
            child = subprocess.Popen([sys.executable, "-m", "dvc", *args], cwd=workspace, env=env,
                                     start_new_session=True)  # its own session: a timeout stops all of it
            try:
                code = child.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
                raise VersioningError(f"`dvc {' '.join(args)}` in {workspace.resolve()} ran past {timeout_s:g} s "
                                      "and was stopped (flow.train_timeout_s)") from None
            if code != 0:
                raise VersioningError(f"`dvc {' '.join(args)}` failed in {workspace.resolve()} (exit {code}); "
                                      "its output is above")
        after = _locked_stages(workspace)
    return [stage for stage in after if after[stage] != before.get(stage)]


def _last_lines(text: str, n: int = 3) -> str:
    return " / ".join(line.strip() for line in text.splitlines()[-n:] if line.strip()) or "no output"


def _git(workspace: Path, *args: str) -> subprocess.CompletedProcess:
    return _run_command(["git", *args], workspace, GIT_TIMEOUT_S)


def in_git_work_tree(workspace: Path) -> bool:
    done = _git(workspace, "rev-parse", "--is-inside-work-tree")
    return done.returncode == 0 and done.stdout.strip() == "true"


def _commit(workspace: Path, path: Path, message: str) -> str | None:
    """Commit just `path` when it differs from HEAD; the new commit's sha, or None when unchanged."""
    relative = str(path.relative_to(workspace))
    if not _git(workspace, "status", "--porcelain", "--", relative).stdout.strip():
        return None
    _git(workspace, "add", "--", relative)
    identity = () if _git(workspace, "config", "user.email").stdout.strip() else GIT_IDENTITY
    done = _git(workspace, *identity, "commit", "-q", "-m", message, "--", relative)
    if done.returncode != 0:
        raise VersioningError(f"git commit of {relative} failed: {_last_lines(done.stderr or done.stdout)}")
    return _git(workspace, "rev-parse", "HEAD").stdout.strip()


def version_data(params: DataParams, message: str, workspace: Path = Path("."),
                 expect_md5: str | None = None) -> DataVersion:
    """`dvc add` data/, commit data.dvc (git work tree only) and `dvc push` it: one new dataset version.

    With expect_md5, a different result is refused and data.dvc left as it was. A push that fails (remote
    unreachable) raises after the version is recorded locally; pushing is idempotent, so the next call
    pushes whatever the remote lacks.
    """
    workspace = Path(workspace)
    with dvc_lock(workspace, params.lock_timeout_s):
        return _version_locked(params, message, workspace, expect_md5)


def _version_locked(params: DataParams, message: str, workspace: Path, expect_md5: str | None) -> DataVersion:
    tracked = dvc_file(params, workspace)
    before = tracked.read_bytes() if tracked.is_file() else None
    _dvc(workspace, "add", str(params.root), timeout_s=params.lock_timeout_s,
         command_timeout_s=params.command_timeout_s)
    md5 = dvc_md5(params, workspace)
    if expect_md5 is not None and md5 != expect_md5:
        if before is not None:
            tracked.write_bytes(before)
        raise VersioningError(f"{tracked.name} names dataset version {expect_md5}, but {params.root}/ holds "
                              f"{md5}; run `dvc pull -r <remote>` against the remote that holds {expect_md5}")
    commit = None
    if params.git_commit and in_git_work_tree(workspace):
        commit = _commit(workspace, dvc_file(params, workspace), message)
    try:
        _dvc(workspace, "push", "--quiet", "-r", params.remote, dvc_file(params).as_posix(),
             timeout_s=params.lock_timeout_s, command_timeout_s=params.command_timeout_s)
    except VersioningError as error:
        raise VersioningError(f"dataset version {md5} is recorded in {dvc_file(params)} but was not pushed "
                              f"to DVC remote '{params.remote}': {error}. The next run pushes it.") from None
    log.info("dataset version %s (%s)%s, pushed to '%s'", md5, message,
             f", committed {commit[:8]}" if commit else "", params.remote)
    return DataVersion(md5, commit)


def restore_data(params: DataParams, workspace: Path = Path(".")) -> str:
    """Make data/ match data.dvc: from the DVC cache, else the remote; with neither, a fresh workspace
    starts the empty store (only when that is the version data.dvc names). Returns what it did."""
    workspace = Path(workspace)
    root = workspace / params.root
    if root.exists():
        return "present"
    with dvc_lock(workspace, params.lock_timeout_s):
        if dvc_file(params, workspace).is_file():
            for command in ("checkout", "pull"):
                try:
                    _dvc(workspace, command, "--quiet", dvc_file(params).as_posix(), timeout_s=params.lock_timeout_s,
                         command_timeout_s=params.command_timeout_s)
                    return command
                except VersioningError as error:
                    log.debug("dvc %s: %s", command, error)
        expected = dvc_md5(params, workspace)
        root.mkdir(parents=True)
        (root / "README.md").write_text(STORE_README)
    try:
        version_data(params, "data: start the labelled data store", workspace, expect_md5=expected)
    except VersioningError:
        shutil.rmtree(root)
        raise
    return "created"


@dataclass
class IngestResult:
    merged: list[str] = field(default_factory=list)  # inbox entries merged into the store
    quarantined: dict[str, str] = field(default_factory=dict)  # entry -> why it was refused
    wafers_added: int = 0
    version: DataVersion | None = None


def ingest(params: Params, sources: list[Path] | None = None, workspace: Path = Path(".")) -> IngestResult:
    """Merge labelled wafers (default: every entry of the labelled inbox) into data.store and version data/.

    Each entry is all or nothing: one bad wafer, a wafer without a mask, or a wafer id already in the store
    (or in another entry) quarantines the whole entry with the reason. Merged entries move to data.ingested.
    """
    data = params.data
    workspace = Path(workspace)
    result = IngestResult()
    with dvc_lock(workspace, data.lock_timeout_s):
        store = workspace / data.store
        recover_directory(store)  # a kill mid-replace must not make the next ingest forget the store
        result.version, finished = _finish_pending(data, workspace, params.infer.wafer_table_lot_wafers)
        if sources is None:
            entries = _inbox_entries(workspace / data.inbox)
        else:
            entries = [Path(s) for s in sources if str(s) not in finished]
        kept = list(WaferDataset(store).wafers(with_origin=True)) if (store / INDEX_FILE).is_file() else []
        known = {(w.lot_id, w.wafer_id): w.source for w in kept}
        added: list[Wafer] = []
        for entry in entries:
            # sources named on the command line may be pickles; inbox entries never are opened as one
            wafers, problem = _labelled_wafers(entry, known, params.infer.wafer_table_lot_wafers,
                                               named=sources is not None)
            if problem:
                result.quarantined[str(entry)] = problem
                _quarantine(entry, problem, workspace / data.quarantine)
                continue
            known.update({(w.lot_id, w.wafer_id): w.source for w in wafers})
            added += wafers
            result.merged.append(str(entry))
        if added:
            lots = len({w.lot_id for w in added})
            names = ", ".join(Path(m).name for m in result.merged)
            message = f"data: ingest {len(added)} labelled wafers in {lots} lots from {names}"
            _write_pending(workspace, message, result.merged)  # first: a kill from here on is finished next run
            write_dataset([*kept, *added], store, params.dataset, params.seed)
            _move_ingested(entries, result.merged, workspace / data.ingested)
            result.wafers_added = len(added)
            result.version = _version_locked(data, message, workspace, None)
            (workspace / PENDING_FILE).unlink()
    for entry, problem in result.quarantined.items():
        log.warning("quarantined %s: %s", entry, problem)
    return result


def _write_pending(workspace: Path, message: str, merged: list[str]) -> None:
    """Record, durably, the version an ingest is about to make and the entries it merges."""
    with atomic_file(workspace / PENDING_FILE, durable=True) as staging, open(staging, "w", encoding="utf-8") as handle:
        json.dump({"message": message, "merged": merged}, handle)


def _finish_pending(data: DataParams, workspace: Path, lot_wafers: int) -> tuple[DataVersion | None, list[str]]:
    """Finish what an interrupted ingest recorded as pending (killed, or its push failed): an entry still in
    the inbox whose wafers are all in the store moves out (the store was written; left, it would be
    refused as a duplicate), any other stays to be merged now; then data/ is versioned as it is (`dvc add`,
    commit, push). A push that fails again is logged; the record stays and this ingest's versioning retries.
    Returns the version made and the entries moved out."""
    path = workspace / PENDING_FILE
    if not path.is_file():
        return None, []
    pending = json.loads(path.read_text(encoding="utf-8"))
    log.warning("finishing an interrupted ingest: %s", pending["message"])
    store = workspace / data.store
    index = WaferDataset(store).index if (store / INDEX_FILE).is_file() else None
    stored = set() if index is None else set(zip(index["lot_id"], index["wafer_id"]))
    merged = [Path(entry) for entry in pending["merged"]]
    done = [str(entry) for entry in merged if entry.exists() and _all_stored(entry, stored, lot_wafers)]
    _move_ingested(merged, done, workspace / data.ingested)
    try:
        version = _version_locked(data, pending["message"], workspace, None)
    except VersioningError as error:
        log.warning("%s", error)
        return None, done
    path.unlink()
    return version, done


def _all_stored(entry: Path, stored: set[tuple[str, str]], lot_wafers: int) -> bool:
    try:
        items = list(iter_source(entry, wafers_per_lot=lot_wafers))
    except WaferError:
        return False
    return all(isinstance(item, Wafer) and (item.lot_id, item.wafer_id) in stored for item in items)


def _inbox_entries(inbox: Path) -> list[Path]:
    if not inbox.is_dir():
        return []
    return sorted(entry for entry in inbox.iterdir() if not entry.name.startswith("."))


def _labelled_wafers(entry: Path, known: dict[tuple[str, str], str], lot_wafers: int, named: bool
                     ) -> tuple[list[Wafer], str | None]:
    """Every wafer of one inbox entry, or the first reason to refuse the whole entry."""
    try:
        items = list(iter_source(entry, wafers_per_lot=lot_wafers, named=named))
    except WaferError as error:
        return [], str(error)
    wafers = []
    for item in items:
        if isinstance(item, Rejected):
            return [], item.reason  # it names the file (and the wafer)
        key = (item.lot_id, item.wafer_id)
        if item.mask is None and item.label is None:
            return [], f"{item.source}: wafer {item.lot_id}/{item.wafer_id} is not labelled (labelled data needs " \
                       "die masks: a `label` column or a .mask.npy; or a wafer-level `failure_type`)"
        if key in known:
            return [], f"wafer {item.lot_id}/{item.wafer_id} in {item.source} is already in the dataset from {known[key]}"
        wafers.append(item)
    if not wafers:
        return [], f"{entry}: no wafers"
    return wafers, None


def _unique_destination(directory: Path, name: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / name
    if target.exists() or target.is_symlink():
        target = directory / f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{name}"
    return target


def _quarantine(entry: Path, problem: str, quarantine: Path) -> None:
    target = _unique_destination(quarantine, entry.name)
    if entry.exists() or entry.is_symlink():
        shutil.move(str(entry), target)
    target.with_name(target.name + ".reason.txt").write_text(problem + "\n")


def _move_ingested(entries: list[Path], merged: list[str], ingested: Path) -> None:
    for entry in entries:
        if str(entry) in merged and entry.exists():
            shutil.move(str(entry), _unique_destination(ingested, entry.name))
