"""Concurrency: two inference runs on one inbox report each lot once, also while an ingest versions data in the
same workspace; a second nightly run is refused."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from pipeline import report
from pipeline.infer import claim_lot, infer
from pipeline.io import write_npy_lots
from pipeline.locks import hold_lock, release

from .catalogue import good_wafer
from .workloads import lot_id, lots_inbox, python_child

pytestmark = [pytest.mark.slow, pytest.mark.integration]  # several processes at once

N_LOTS = 30
RUNS = 2
INFER_CHILD = """
import json, sys, time
from pathlib import Path
from pipeline.infer import infer
from pipeline.params import Params
params = Params.model_validate_json(Path(sys.argv[1]).read_text())
Path(sys.argv[4] + ".ready").touch()
while not Path(sys.argv[5]).exists():  # start together
    time.sleep(0.01)
summary = infer(Path(sys.argv[2]), Path(sys.argv[3]), params, model_uri=sys.argv[6], index=False)
Path(sys.argv[4]).write_text(json.dumps({"reported": summary.reported_lots, "read": summary.read,
                                         "left_to_others": summary.lots_left_to_others}))
"""


def test_two_runs_on_one_inbox_report_every_lot_exactly_once(tmp_path, params, checkpoint):
    params = params.model_copy(update={"infer": params.infer.model_copy(update={"chunk_wafers": 3})})
    inbox, out, go = lots_inbox(tmp_path, N_LOTS, per_lot=3), tmp_path / "out", tmp_path / "go"
    (tmp_path / "params.json").write_text(params.model_dump_json())
    results = [tmp_path / f"run{i}.json" for i in range(RUNS)]
    children = [python_child(INFER_CHILD, str(tmp_path / "params.json"), str(inbox), str(out), str(result), str(go),
                             checkpoint) for result in results]
    _start_together(results, go)
    logs = [child.communicate(timeout=300)[1] for child in children]
    assert [child.returncode for child in children] == [0] * RUNS, logs

    runs = [json.loads(result.read_text()) for result in results]
    reported = [lot for run in runs for lot in run["reported"]]
    expected = [lot_id(lot) for lot in range(N_LOTS)]
    assert sorted(reported) == expected, f"a lot reported twice or not at all: {runs}"
    assert all(run["read"] == 3 * N_LOTS for run in runs)
    assert all(report.read_manifest(out / lot) for lot in expected)


INGEST_CHILD = """
import json, sys, time
from pathlib import Path
from pipeline.params import Params
from pipeline.versioning import ingest
params = Params.model_validate_json(Path(sys.argv[1]).read_text())
Path(sys.argv[3] + ".ready").touch()
while not Path(sys.argv[4]).exists():
    time.sleep(0.01)
result = ingest(params, workspace=Path(sys.argv[2]))
Path(sys.argv[3]).write_text(json.dumps({"added": result.wafers_added, "quarantined": result.quarantined,
                                         "md5": result.version.md5 if result.version else None}))
"""


def _start_together(children_results: list[Path], go: Path) -> None:
    deadline = time.monotonic() + 300
    while not all(Path(f"{r}.ready").exists() for r in children_results) and time.monotonic() < deadline:
        time.sleep(0.05)
    go.touch()


def test_two_inference_runs_and_an_ingest_at_once_in_one_workspace_lose_nothing(tmp_path, params, checkpoint):
    """What a workspace sees when infer_lots groups overlap a manual ingest: every lot reported once, every
    labelled wafer merged once and its version pushed, nothing quarantined."""
    from pipeline.dataset import WaferDataset
    from pipeline.versioning import dvc_md5
    from tests.dvc_repo import dvc, dvc_repo, git

    workspace = dvc_repo(tmp_path / "ws", tmp_path / "remote")
    inbox, out, go = lots_inbox(tmp_path / "lots", 12, per_lot=3), workspace / "reports", tmp_path / "go"
    labelled = workspace / params.data.inbox
    write_npy_lots([good_wafer(f"LAB{lot}", f"w{i}", seed=100 + 10 * lot + i) for lot in range(2) for i in range(3)],
                   labelled)
    (tmp_path / "params.json").write_text(params.model_dump_json())
    results = [tmp_path / f"run{i}.json" for i in range(RUNS)] + [tmp_path / "ingest.json"]
    children = [python_child(INFER_CHILD, str(tmp_path / "params.json"), str(inbox), str(out), str(result), str(go),
                             checkpoint) for result in results[:RUNS]]
    children.append(python_child(INGEST_CHILD, str(tmp_path / "params.json"), str(workspace), str(results[-1]),
                                 str(go)))
    _start_together(results, go)
    logs = [child.communicate(timeout=300)[1] for child in children]
    assert [child.returncode for child in children] == [0] * len(children), logs

    runs = [json.loads(result.read_text()) for result in results[:RUNS]]
    assert sorted(lot for run in runs for lot in run["reported"]) == [lot_id(lot) for lot in range(12)]
    ingested = json.loads(results[-1].read_text())
    assert ingested["added"] == 6 and ingested["quarantined"] == {}
    assert len(WaferDataset(workspace / params.data.store)) == 6 and not any(labelled.iterdir())
    assert ingested["md5"] == dvc_md5(params.data, workspace)
    assert dvc(workspace, "status", "-c", "-q", "data.dvc").strip() == "", "the version was not pushed"
    assert git(workspace, "log", "--format=%s").count("data: ingest 6 labelled wafers") == 1


def test_a_lot_held_by_another_run_is_left_to_it_then_reported_by_the_next_run(tmp_path, params, checkpoint):
    inbox, out = lots_inbox(tmp_path, 3, per_lot=3), tmp_path / "out"
    held = claim_lot(out, "L01")  # another run is writing L01's report
    first = infer(inbox, out, params, model_uri=checkpoint)
    assert first.reported_lots == ["L00", "L02"] and first.lots_left_to_others == 1
    assert first.read == first.reported + first.quarantined + first.skipped
    assert not (out / "L01").exists()
    release(held)  # it died without writing: the next run reports the lot
    second = infer(inbox, out, params, model_uri=checkpoint)
    assert second.reported_lots == ["L01"] and second.lots_skipped == 2


def test_the_nightly_flow_refuses_to_start_while_another_run_holds_the_workspace(tmp_path, prefect_api):
    from flows.nightly import WorkspaceBusy, nightly

    (tmp_path / "params.yaml").write_text(f"flow: {{workspace_lock: {tmp_path / 'nightly.lock'}}}\n")
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        with hold_lock(tmp_path / "nightly.lock"):
            with pytest.raises(WorkspaceBusy, match=rf"another nightly run \(pid {os.getpid()}\) holds the "
                                                    r"workspace lock .*nightly.lock; this run did nothing"):
                nightly(tmp_path / "params.yaml")
    finally:
        os.chdir(cwd)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nightly.lock", "params.yaml"]


def test_runs_sharing_an_out_keep_every_quarantined_input(tmp_path, params, checkpoint):
    """Each infer_lots group (and each nightly) adds its lot-less rejects to OUT/quarantine.csv; none
    overwrites another's rows, and a rerun on the same inputs does not repeat them."""
    import pandas as pd

    from pipeline.infer import UNASSIGNED_QUARANTINE

    out = tmp_path / "out"
    groups = []
    for name in ("a", "b"):
        bad = tmp_path / name / "wafers.txt"
        bad.parent.mkdir()
        bad.write_text("not a wafer source")
        groups.append(bad)
        infer([bad], out, params, model_uri=checkpoint, index=False)
    infer([groups[0]], out, params, model_uri=checkpoint, index=False)

    rows = pd.read_csv(out / UNASSIGNED_QUARANTINE, dtype=str, keep_default_na=False)
    assert sorted(rows["source"]) == sorted(map(str, groups))
    assert rows["reason"].str.contains("unknown input format").all()
