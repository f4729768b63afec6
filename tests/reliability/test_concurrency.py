"""Concurrency: two inference runs on one inbox report each lot once; a second nightly run is refused."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from pipeline import report
from pipeline.infer import claim_lot, infer
from pipeline.locks import hold_lock, release

from .workloads import lot_id, lots_inbox, python_child

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
    deadline = time.monotonic() + 300
    while not all(Path(f"{r}.ready").exists() for r in results) and time.monotonic() < deadline:
        time.sleep(0.05)
    go.touch()
    logs = [child.communicate(timeout=300)[1] for child in children]
    assert [child.returncode for child in children] == [0] * RUNS, logs

    runs = [json.loads(result.read_text()) for result in results]
    reported = [lot for run in runs for lot in run["reported"]]
    expected = [lot_id(lot) for lot in range(N_LOTS)]
    assert sorted(reported) == expected, f"a lot reported twice or not at all: {runs}"
    assert all(run["read"] == 3 * N_LOTS for run in runs)
    assert all(report.read_manifest(out / lot) for lot in expected)


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
