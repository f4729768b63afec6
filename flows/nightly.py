"""The nightly pipeline as one Prefect flow; every task is one call into `pipeline`.

prepare the workspace -> ingest labelled data (DVC-versioned) -> `dvc repro` of dvc.yaml (generate, split,
train with registration and gate: DVC runs what is stale, nothing when nothing changed) -> infer every new lot
of the inbox with the champion -> Prefect artifacts. Prefect keeps the schedule, retries, timeouts, the
workspace lock and the artifacts. `python -m flows.nightly` runs it once on Prefect's ephemeral API.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import typer
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from pipeline import infer, registry, stages, versioning
from pipeline.locks import LockHeld, hold_lock
from pipeline.params import Params, load_params, resolve_profile, set_profile


@task(name="prepare-workspace", tags=["dvc", "io"])
def prepare_workspace(params: Params) -> dict:
    data = versioning.restore_data(params.data)  # DVC work waits on the workspace's DVC file lock
    seeded = infer.seed_inbox(params.flow.seed_lots, params.infer.inbox) if params.flow.seed_lots else 0
    return {"data": data, "inbox_seeded_wafers": seeded}


@task(name="ingest-labelled", tags=["dvc", "io"])
def ingest_labelled(params: Params) -> versioning.IngestResult:
    return versioning.ingest(params)


@task(name="reproduce-pipeline", tags=["dvc", "gpu"])
def reproduce_pipeline(params: Params, always_train: bool) -> tuple[list[str], dict | None]:
    """`dvc repro` of dvc.yaml: DVC runs the stale stages (generate, split, train with its registration and
    gate) and records them in dvc.lock. Returns the stages that ran and, when train ran, its summary."""
    ran = versioning.reproduce(params.data, params.flow.train_timeout_s, force=("train",) if always_train else ())
    summary = params.train.reports_dir / stages.TRAIN_SUMMARY
    return ran, json.loads(summary.read_text()) if "train" in ran else None


@task(name="infer-inbox", tags=["io"])
def infer_inbox(params: Params) -> infer.InferSummary:
    return infer.infer(params.infer.inbox, params.infer.out, params, named=True)  # the inbox params names


@task(name="publish-artifacts")
def publish_artifacts(params: Params, dataset_md5: str | None, trained: dict | None, champion: str | None,
                      inferred: infer.InferSummary) -> None:
    counts = infer.lot_pattern_counts(params.infer.out, inferred.reported_lots)
    create_markdown_artifact(key="nightly-summary", markdown=summary_markdown(
        params, dataset_md5, trained, champion, inferred), description="waferseg nightly run")
    if len(counts):
        create_table_artifact(key="lot-patterns", table=counts.reset_index().to_dict(orient="records"),
                              description="wafers per dominant pattern, per lot reported in this run")
    for lot_id in inferred.reported_lots:
        create_link_artifact(key=_artifact_key(lot_id),
                             link=(params.infer.out / lot_id / "report.html").resolve().as_uri(),
                             link_text=f"lot {lot_id} report")


def _artifact_key(lot_id: str) -> str:
    """Prefect keys allow lowercase letters, digits and dashes only."""
    return "lot-" + "".join(c if c.isalnum() else "-" for c in lot_id.lower())


def summary_markdown(params: Params, dataset_md5: str | None, trained: dict | None, champion: str | None,
                     inferred: infer.InferSummary) -> str:
    if trained:
        model = (f"trained model version **{trained['model_version']}** (run `{trained['run_id']}`): test mIoU "
                 f"{trained['test_miou']:.4f}, defect mIoU {trained['test_defect_miou']:.4f}; real test: WM-811K "
                 f"balanced accuracy {trained.get('test_wm811k_balanced_accuracy', float('nan')):.4f}, false alarms "
                 f"{trained.get('test_wm811k_false_alarm_rate', float('nan')):.4f}, MixedWM38 exact match "
                 f"{trained.get('test_mixedwm38_exact_match', float('nan')):.4f}\n\n"
                 f"gate: {trained['gate']}")
    else:
        model = f"training not rerun: `dvc repro` found its inputs unchanged (champion: version **{champion}**)"
    mix = ", ".join(f"{name} {count}" for name, count in inferred.class_mix.items()) or "none yet"
    return (f"# waferseg nightly ({params.profile} profile)\n\n"
            f"- labelled data version (DVC md5 of `{params.data.root}/`): `{dataset_md5}`\n- {model}\n"
            f"- inference with `{inferred.model_version}`: {inferred.read} wafers read, {inferred.reported} reported "
            f"in {inferred.lots_reported} lots, {inferred.quarantined} quarantined, {inferred.skipped} already "
            f"reported\n- dominant patterns over all reports: {mix}\n"
            f"- index: {(params.infer.out / 'index.html').resolve().as_uri()}\n")


class WorkspaceBusy(RuntimeError):
    """Another nightly run holds this workspace."""


@flow(name="waferseg-nightly", log_prints=False)
def nightly(params_path: Path = Path("params.yaml"), profile: str | None = None, always_train: bool = False) -> dict:
    """Ingest and version, `dvc repro` the pipeline (it retrains only when an input of train changed, or with
    always_train), then report every new lot. A profile given here is written to params.yaml (`profile:`),
    where DVC sees it. Refused while another nightly run holds the workspace (params flow.workspace_lock)."""
    params = load_params(params_path)
    try:
        with hold_lock(params.flow.workspace_lock):
            if profile and profile != params.profile:
                set_profile(params_path, profile)
                get_run_logger().info("%s: profile set to %s (dvc.lock records it)", params_path, profile)
            return run_nightly(resolve_profile(load_params(params_path)), always_train)
    except LockHeld as held:
        raise WorkspaceBusy(f"{Path.cwd()}: another nightly run ({held.holder}) holds the workspace lock "
                            f"{held.path}; this run did nothing. Let that one finish and run again.") from None


def run_nightly(params: Params, always_train: bool) -> dict:
    flow_params = params.flow
    io_options = {"retries": flow_params.retries, "retry_delay_seconds": flow_params.retry_delay_s,
                  "timeout_seconds": flow_params.io_timeout_s}

    prepared = prepare_workspace.with_options(**io_options)(params)
    ingested = ingest_labelled.with_options(**io_options)(params)
    dataset_md5 = versioning.dvc_md5(params.data)
    ran, trained = reproduce_pipeline.with_options(timeout_seconds=flow_params.train_timeout_s)(params, always_train)
    inferred = infer_inbox.with_options(retries=flow_params.retries, retry_delay_seconds=flow_params.retry_delay_s,
                                        timeout_seconds=flow_params.infer_timeout_s)(params)
    registry.configure(params.registry)
    champion = registry.current_champion(params.registry.model_name)
    publish_artifacts(params, dataset_md5, trained, champion, inferred)
    return {"profile": params.profile, "workspace": prepared, "ingested_wafers": ingested.wafers_added,
            "quarantined_sources": ingested.quarantined, "dataset_md5": dataset_md5, "stages_run": ran,
            "trained": trained, "champion_version": champion, "tracking_uri": registry.tracking_uri(params.registry),
            "inferred": {"read": inferred.read, "reported": inferred.reported, "lots_reported": inferred.lots_reported,
                         "quarantined": inferred.quarantined, "skipped": inferred.skipped},
            "index": str((params.infer.out / "index.html").resolve())}


def main(params_path: Path = typer.Option(Path("params.yaml"), "--params"),
         profile: str = typer.Option(None, "--profile"),
         always_train: bool = typer.Option(False, "--always-train", help="Rerun train even when DVC finds it current.")):
    """Run the nightly flow once (Prefect's ephemeral API unless PREFECT_API_URL points at a server)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = nightly(params_path, profile, always_train)
    trained = result["trained"]
    print(f"MLflow: {result['tracking_uri']}"
          + (f" run {trained['run_id']}" if trained else " (no new run: `dvc repro` found train current)")
          + f"  (browse: mlflow ui --backend-store-uri {result['tracking_uri']})")
    print(f"champion: models:/{load_params(params_path).registry.model_name}@champion = version "
          f"{result['champion_version']}")
    print(f"reports: {result['inferred']['reported']} wafers in {result['inferred']['lots_reported']} lots "
          f"reported, {result['inferred']['skipped']} already current; index: {result['index']}")


if __name__ == "__main__":
    typer.run(main)
