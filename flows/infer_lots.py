"""Batch inference alone, for lots that arrive during the day: one mapped task per group of lots.

`python -m flows.infer_lots [--runner dask]`: with dask, tasks run on a `distributed` cluster (params.yaml
`flow.dask_address`, else a LocalCluster of `flow.dask_workers` processes) so inference scales out.
"""

from __future__ import annotations

import logging
from pathlib import Path

import typer
from prefect import flow, task, unmapped
from prefect.task_runners import ThreadPoolTaskRunner

from pipeline import infer, registry, report
from pipeline.params import FlowParams, Params, load_params, resolve_profile


@task(name="infer-lots")
def infer_group(sources: list[Path], params: Params, model_uri: str) -> dict:
    summary = infer.infer(sources, params.infer.out, params, model_uri=model_uri, index=False)
    return {"read": summary.read, "reported": summary.reported, "quarantined": summary.quarantined,
            "skipped": summary.skipped, "lots": summary.reported_lots}


def groups_of(sources: list[Path], size: int) -> list[list[Path]]:
    return [sources[i : i + size] for i in range(0, len(sources), size)]


@flow(name="waferseg-infer-lots")
def infer_lots(params_path: Path = Path("params.yaml"), source: Path | None = None, model_uri: str | None = None,
               lots_per_task: int = 64, profile: str | None = None) -> dict:
    """Report every lot of `source` (default: the lots inbox) not yet reported by the model version."""
    params = resolve_profile(load_params(params_path), profile)
    model_uri = model_uri or params.infer.model_uri
    if model_uri.startswith("models:/"):  # pin the version once: every task reports with the same weights
        registry.configure(params.registry)
        model_uri = f"models:/{registry.resolve_version(model_uri)}"
    groups = groups_of(infer.inbox_sources(source or params.infer.inbox), lots_per_task)
    results = [future.result() for future in infer_group.map(groups, unmapped(params), unmapped(model_uri))]
    report.write_index(params.infer.out)
    totals = {key: sum(r[key] for r in results) for key in ("read", "reported", "quarantined", "skipped")}
    return {**totals, "lots_reported": sum(len(r["lots"]) for r in results), "tasks": len(groups)}


def task_runner(name: str, flow_params: FlowParams):
    if name == "thread":
        return ThreadPoolTaskRunner(max_workers=1)  # torch already uses every core of this process
    if name == "dask":
        from prefect_dask import DaskTaskRunner

        if flow_params.dask_address:
            return DaskTaskRunner(address=flow_params.dask_address)
        return DaskTaskRunner(cluster_class="distributed.LocalCluster",
                              cluster_kwargs={"n_workers": flow_params.dask_workers, "threads_per_worker": 1,
                                              "processes": True, "dashboard_address": None})
    raise typer.BadParameter(f"unknown runner {name!r}: thread or dask")


def main(params_path: Path = typer.Option(Path("params.yaml"), "--params"),
         source: Path = typer.Option(None, "--source", help="Lots to report (default: infer.inbox)."),
         model: str = typer.Option(None, "--model", help="Model URI or checkpoint (default: infer.model_uri)."),
         runner: str = typer.Option("thread", "--runner", help="thread (this process) or dask."),
         lots_per_task: int = typer.Option(64, "--lots-per-task")):
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    params = load_params(params_path)
    configured = infer_lots.with_options(task_runner=task_runner(runner, params.flow))
    result = configured(params_path, source, model, lots_per_task)
    print(f"{result['read']} wafers read: {result['reported']} reported in {result['lots_reported']} lots, "
          f"{result['quarantined']} quarantined, {result['skipped']} already current ({result['tasks']} tasks); "
          f"index: {(params.infer.out / 'index.html').resolve()}")


if __name__ == "__main__":
    typer.run(main)
