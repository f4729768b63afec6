"""SIGKILL of the nightly flow at each of its steps, then a rerun: nothing lost, everything versioned once.

The child runs the real flow against the session's Prefect API; the moment the step runs, in the flow or in
a stage command DVC started, every process of the run is killed (SIGKILL: no cleanup, no `finally`). The
rerun is an ordinary nightly run in the same workspace."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import report
from pipeline.dataset import WaferDataset
from pipeline.io import write_npy_lots
from pipeline.params import load_params
from tests.dvc_repo import dvc, git
from tests.nightly_workspace import SEED_LOTS, nightly_workspace, synthetic_wafers

from .workloads import PROJECT

pytestmark = [pytest.mark.slow, pytest.mark.integration]  # the nightly flow, killed and rerun

KILL_HOOK = Path(__file__).parent / "kill_hook"  # its sitecustomize kills every process of the run at the step
NIGHTLY = "import os, sys; from pathlib import Path; from flows.nightly import nightly; os.chdir(sys.argv[1]); " \
          "nightly(Path('params.yaml'))"

STEPS = {  # the step: (module, function, calls that go through before the kill); DVC runs the middle two as
    # `waferseg generate` / `waferseg train` child processes
    "ingest, store written, entries not yet moved": ("pipeline.versioning", "_move_ingested", 0),
    "synthetic set half generated": ("pipeline.synth", "generate_lot", 6),  # of 12 lots
    "training, at the first checkpoint": ("pipeline.checkpoint", "save_checkpoint", 0),
    "inference, one lot built": ("pipeline.report", "build_lot_report", 1),
}
LABELLED_WAFERS = 6


@pytest.mark.parametrize("step", list(STEPS))
def test_a_nightly_killed_at_a_step_then_rerun_loses_nothing_and_versions_once(tmp_path, prefect_api, monkeypatch,
                                                                                step):
    from prefect.settings import PREFECT_API_URL

    from flows.nightly import nightly

    root = nightly_workspace(tmp_path / "ws")
    write_npy_lots(synthetic_wafers(12, n=LABELLED_WAFERS, prefix="LAB"), root / "inbox" / "labelled" / "batch1")
    module, function, calls_before = STEPS[step]
    child = subprocess.Popen(
        [sys.executable, "-c", NIGHTLY, str(root)], cwd=PROJECT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,  # the flow's own process group: the hook kills it (and DVC's)
        env={**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "WAFERSEG_KILL_AT":
             f"{module}:{function}:{calls_before}", "PYTHONPATH": os.pathsep.join([str(KILL_HOOK), str(PROJECT)])})
    output, _ = child.communicate(timeout=600)
    assert child.returncode == -9, f"the child was not killed at {step}:\n{output[-3000:]}"

    monkeypatch.chdir(root)
    result = nightly(root / "params.yaml")

    params = load_params(root / "params.yaml")
    assert result["champion_version"] is not None
    assert all(report.read_manifest(params.infer.out / lot) for lot in SEED_LOTS), "a lot was not reported"
    assert len(WaferDataset(root / params.data.store)) == LABELLED_WAFERS, "labelled wafers lost or doubled"
    assert not (root / "inbox" / "labelled" / "batch1").exists()
    assert not (root / params.data.quarantine).exists() or not any((root / params.data.quarantine).iterdir())
    log = git(root, "log", "--format=%s", "--", "data.dvc")
    assert log.count(f"ingest {LABELLED_WAFERS} labelled wafers") == 1, log
    assert dvc(root, "status", "-c", "-q", "data.dvc").strip() == "", "the data version was not pushed"
