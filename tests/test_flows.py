"""The Prefect flows on a temporary Prefect API: the nightly pipeline (ingest, `dvc repro`, inference) end to
end on a tiny profile, a second run where DVC finds everything current, a retried task, a profile switch, and
infer_lots on a 2-worker Dask cluster."""

import os
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import yaml

from pipeline import io
from tests.nightly_workspace import SEED_LOTS, nightly_workspace, synthetic_wafers as _wafers

pytestmark = [pytest.mark.slow, pytest.mark.integration]  # Prefect flows end to end, with training


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return nightly_workspace(tmp_path_factory.mktemp("nightly"))


@pytest.fixture(scope="module")
def first_run(workspace, prefect_api):
    from flows.nightly import nightly

    cwd = os.getcwd()
    os.chdir(workspace)
    try:
        state = nightly(workspace / "params.yaml", return_state=True)
        yield workspace, state.result() | {"flow_run_id": state.state_details.flow_run_id}
    finally:
        os.chdir(cwd)


def test_nightly_ingests_trains_registers_and_reports_every_lot(first_run):
    root, result = first_run
    assert result["workspace"] == {"data": "created", "inbox_seeded_wafers": 9}
    assert result["trained"]["model_version"] == "1" and result["champion_version"] == "1"
    assert result["stages_run"] == ["generate", "split", "train"]
    locked = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    assert locked["train"]["outs"][0]["path"] == "models/fcn8s.pt" and locked["train"]["params"]["params.yaml"]["train"]
    assert result["inferred"] == {"read": 9, "reported": 9, "lots_reported": 3, "quarantined": 0, "skipped": 0}
    assert result["dataset_md5"].endswith(".dir")
    for lot in SEED_LOTS:
        assert (root / "reports" / "lots" / lot / "manifest.json").is_file()
    assert Path(result["index"]).is_file()


def test_nightly_publishes_a_summary_a_pattern_table_and_report_links(first_run):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    _, result = first_run

    def latest(key: str) -> dict:  # of this flow run: other tests run nightlies on the same API
        with get_client(sync_client=True) as client:
            found = client.read_artifacts(artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=[key]), flow_run_id=ArtifactFilterFlowRunId(any_=[result["flow_run_id"]])))
        assert found, f"no artifact {key}"
        return found[-1].model_dump()

    summary, table, link = (latest(key)["data"] for key in ("nightly-summary", "lot-patterns", "lot-real11-00001"))
    assert "gate: version 1 is champion" in summary and "DVC md5" in summary
    assert "REAL11-00000" in str(table)
    assert "REAL11-00001/report.html" in link


def test_a_second_run_without_new_data_runs_no_stage_and_reprocesses_nothing_despite_a_failing_task(
        first_run, monkeypatch):
    from flows import nightly as nightly_module
    from pipeline import infer

    root, _ = first_run
    calls = []
    real_infer = infer.infer

    def flaky_infer(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise OSError("disk briefly unavailable")  # the task's retry must absorb this
        return real_infer(*args, **kwargs)

    monkeypatch.setattr(nightly_module.infer, "infer", flaky_infer)
    monkeypatch.chdir(root)
    result = nightly_module.nightly(root / "params.yaml")
    assert len(calls) == 2
    assert result["stages_run"] == [] and result["trained"] is None and result["champion_version"] == "1"
    assert result["inferred"]["reported"] == 0 and result["inferred"]["skipped"] == 9


def test_new_labelled_data_is_versioned_and_retrains(first_run, monkeypatch):
    from flows.nightly import nightly

    root, first = first_run
    monkeypatch.chdir(root)
    io.write_npy_lots(_wafers(12, n=6, prefix="LAB"), root / "inbox" / "labelled" / "batch1")
    result = nightly(root / "params.yaml")
    assert result["ingested_wafers"] == 6
    assert result["dataset_md5"] != first["dataset_md5"] and result["trained"]["model_version"] == "2"
    assert result["stages_run"] == ["split", "train"]  # generate's inputs did not change
    log = subprocess.run(["git", "log", "--format=%s", "--", "data.dvc"], cwd=root, capture_output=True,
                         text=True).stdout
    assert "ingest 6 labelled wafers in 2 lots from batch1" in log


def test_a_changed_setting_reruns_its_stage_and_everything_after_it(first_run, monkeypatch):
    from flows.nightly import nightly

    root, _ = first_run
    monkeypatch.chdir(root)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["synth"]["n_wafers"] += 5  # a nightly that skipped an existing synthetic set would miss this
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    result = nightly(root / "params.yaml")
    assert result["stages_run"] == ["generate", "split", "train"] and result["trained"]["model_version"] == "3"
    assert yaml.safe_load((root / "dvc.lock").read_text())["stages"]["generate"]["params"]["params.yaml"][
        "synth"]["n_wafers"] == params["synth"]["n_wafers"]


def test_infer_lots_on_a_dask_cluster_matches_the_default_runner(first_run, tmp_path):
    from flows.infer_lots import infer_lots, task_runner
    from pipeline.params import load_params

    root, _ = first_run
    params = load_params(root / "params.yaml")
    model = str(root / params.train.model_out)
    outputs = {}
    cwd = os.getcwd()
    os.chdir(root)
    try:
        for runner in ("thread", "dask"):
            out = tmp_path / runner
            data = yaml.safe_load((root / "params.yaml").read_text())
            data["infer"]["out"] = str(out)
            path = tmp_path / f"params-{runner}.yaml"
            path.write_text(yaml.safe_dump(data))
            configured = infer_lots.with_options(task_runner=task_runner(runner, params.flow))
            result = configured(path, None, model, 1)
            assert result["reported"] == 9 and result["tasks"] == 3
            outputs[runner] = out
    finally:
        os.chdir(cwd)
    for lot in SEED_LOTS:
        thread, dask = (pd.read_csv(outputs[r] / lot / "wafers.csv") for r in ("thread", "dask"))
        pd.testing.assert_frame_equal(thread, dask)
        for mask in (outputs["thread"] / lot / "masks").iterdir():
            assert mask.read_bytes() == (outputs["dask"] / lot / "masks" / mask.name).read_bytes()
