"""The `waferseg` command line: one command per pipeline stage, each a thin call into the library."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from pipeline.params import DEFAULT_PARAMS, ParamsError, load_params, resolve_profile
from pipeline.wafer import WaferError

app = typer.Typer(help="Find defect patterns on semiconductor wafer maps.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
console = Console()
log = logging.getLogger("waferseg")

ParamsOption = Annotated[Path, typer.Option("--params", help="params.yaml to read.")]
ProfileOption = Annotated[Optional[str], typer.Option(
    "--profile", help="cpu, full or gpu (default: params.yaml `profile`; auto = gpu when CUDA is present).")]


@app.callback()
def _setup(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s",
                        handlers=[RichHandler(console=Console(stderr=True), show_path=False)], force=True)


def _params(path: Path, profile: str | None = None):
    try:
        return resolve_profile(load_params(path), profile)
    except ParamsError as error:
        console.print(f"[red]{error}[/red]")
        raise typer.Exit(2) from None


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:,.0f}" if value.is_integer() else f"{value:.4g}"
    return str(value)


def print_frame(frame, title: str) -> None:
    table = Table(title=title)
    table.add_column(frame.index.name or "")
    for column in frame.columns:
        table.add_column(str(column), justify="right")
    for name, row in frame.iterrows():
        table.add_row(str(name), *(_cell(v) for v in row))
    console.print(table)


@app.command()
def generate(
    n: Annotated[Optional[int], typer.Option("--n", help="Wafers to generate (default: synth.n_wafers).")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Dataset directory (default: dataset.synthetic_dir).")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Random seed (default: params seed).")] = None,
    compare_real: Annotated[Optional[Path], typer.Option(
        "--compare-real", help="Real wafer source to compare the generator against (table + plot).")] = None,
    params_path: ParamsOption = DEFAULT_PARAMS,
    profile: ProfileOption = None,
) -> None:
    """Generate a synthetic labelled dataset, print its statistics and write a preview."""
    from pipeline import dataset, stages

    params = _params(params_path, profile)
    out = params.dataset.synthetic_dir if out is None else out
    with console.status(f"generating {n or params.synth.n_wafers} wafers"):
        index, preview = stages.generate(params, n, out, seed)
    print_frame(dataset.dataset_stats(index).T, f"{out}: {len(index)} wafers")
    console.print(f"preview: {preview}")
    if compare_real is not None:
        _compare(compare_real, out, params)


def _compare(real_source: Path, dataset_dir: Path, params) -> None:
    from pipeline import dataset, io, synth

    real = synth.stats_table(io.read_wafers(real_source, named=True))
    synthetic = synth.stats_table(dataset.WaferDataset(dataset_dir).wafers())
    table = synth.compare_real(real, synthetic)
    out_dir = params.preview.path.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    table.to_csv(out_dir / "calibration.csv")
    plot = synth.plot_comparison(real, synthetic, out_dir / "calibration.png")
    print_frame(table.T, f"real ({len(real)} wafers, {real_source.name}) vs synthetic ({len(synthetic)})")
    console.print(f"calibration: {out_dir / 'calibration.csv'}, {plot}")


@app.command()
def ingest(
    sources: Annotated[Optional[list[Path]], typer.Argument(
        help="Labelled lot dirs / die tables (default: every entry of data.inbox).")] = None,
    params_path: ParamsOption = DEFAULT_PARAMS,
) -> None:
    """Merge labelled wafers into the DVC-tracked store and version it (dvc add, push, git commit)."""
    from pipeline.versioning import ingest as ingest_labelled

    params = _params(params_path)
    result = ingest_labelled(params, sources or None)
    for entry, problem in result.quarantined.items():
        console.print(f"[yellow]quarantined[/yellow] {entry}: {problem}")
    if result.version:
        console.print(f"merged {result.wafers_added} wafers from {len(result.merged)} source(s): dataset version "
                      f"{result.version.md5}" + (f", commit {result.version.commit[:8]}" if result.version.commit else ""))
    else:
        console.print("nothing new to merge")
    if result.quarantined:
        raise typer.Exit(1)


@app.command()
def split(
    out: Annotated[Optional[Path], typer.Option("--out", help="Dataset to write (default: dataset.dir).")] = None,
    params_path: ParamsOption = DEFAULT_PARAMS,
    profile: ProfileOption = None,
) -> None:
    """Merge the synthetic set and the real labelled store into the training dataset, split per lot."""
    from pipeline import dataset, stages

    params = _params(params_path, profile)
    out = out or params.dataset.dir
    index = stages.split(params, out)
    print_frame(dataset.dataset_stats(index).T, f"{out}: {len(index)} wafers")


@app.command()
def init(
    seed_lots: Annotated[Optional[Path], typer.Option(
        "--seed-lots", help="Wafer source whose lots fill an empty lots inbox (default: flow.seed_lots).")] = None,
    params_path: ParamsOption = DEFAULT_PARAMS,
) -> None:
    """Prepare a workspace: restore data/ from DVC (or start the empty store) and fill the lots inbox."""
    from pipeline.infer import seed_inbox
    from pipeline.versioning import restore_data

    params = _params(params_path)
    console.print(f"{params.data.root}/: {restore_data(params.data)}")
    seed_lots = seed_lots or params.flow.seed_lots
    if seed_lots is not None:
        console.print(f"{params.infer.inbox}/: {seed_inbox(seed_lots, params.infer.inbox)} wafers seeded")


@app.command()
def train(
    dataset_dir: Annotated[Optional[Path], typer.Option("--dataset", help="Dataset dir (default: dataset.dir).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the last checkpoint.")] = False,
    from_scratch: Annotated[bool, typer.Option(
        "--from-scratch", help="Do not warm-start from the champion's weights (see train.warm_start).")] = False,
    params_path: ParamsOption = DEFAULT_PARAMS,
    profile: ProfileOption = None,
) -> None:
    """Train FCN-8s on synthetic and real wafers, log the run to MLflow, register the model, apply the gate."""
    from pipeline import stages

    params = _params(params_path, profile)
    summary = stages.train(params, dataset_dir or params.dataset.dir, resume=resume, from_scratch=from_scratch)
    for key, value in summary.items():
        console.print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")


@app.command()
def evaluate(
    model: Annotated[Optional[str], typer.Option("--model", help="Model URI or checkpoint (default: infer.model_uri).")] = None,
    dataset_dir: Annotated[Optional[Path], typer.Option("--dataset", help="Dataset dir (default: dataset.dir).")] = None,
    split: Annotated[str, typer.Option("--split", help="train, val or test.")] = "test",
    out: Annotated[Path, typer.Option("--out", help="Where the metrics and plots go.")] = Path("reports/evaluate"),
    params_path: ParamsOption = DEFAULT_PARAMS,
    profile: ProfileOption = None,
) -> None:
    """Evaluate a model on a dataset split: metrics, confusion matrix and overlays."""
    from pipeline import stages

    params = _params(params_path, profile)
    metrics = stages.evaluate(model or params.infer.model_uri, dataset_dir or params.dataset.dir, split, out, params)
    for key, value in metrics.items():
        if isinstance(value, float):
            console.print(f"{key}: {value:.4f}")


@app.command("evaluate-real")
def evaluate_real(
    model: Annotated[Optional[str], typer.Option("--model", help="Model URI or checkpoint (default: infer.model_uri).")] = None,
    split: Annotated[str, typer.Option("--split", help="train, val or test of the shipped real sets.")] = "test",
    source: Annotated[Optional[list[Path]], typer.Option(
        "--source", help="Score this labelled wafer source instead (all its wafers); repeatable.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Where metrics, tables and plots go (default: real.reports_dir).")] = None,
    params_path: ParamsOption = DEFAULT_PARAMS,
    profile: ProfileOption = None,
) -> None:
    """Wafer-level scores on real labelled wafers: WM-811K recall per label, balanced accuracy and false alarms;
    MixedWM38 exact pattern-set match and presence F1 per class."""
    from pipeline import stages

    params = _params(params_path, profile)
    tables = stages.evaluate_real(model or params.infer.model_uri, params, split, out or params.real.reports_dir, source)
    console.print(tables)


@app.command("real-splits")
def real_splits(params_path: ParamsOption = DEFAULT_PARAMS) -> None:
    """Record the fixed train/val/test split of every shipped real set (by map content) in real.splits_dir."""
    from pipeline.realdata import write_splits

    params = _params(params_path)
    for name, splits in write_splits(params.real).items():
        console.print(f"{name}: {splits['split'].value_counts().to_dict()}")


@app.command()
def infer(
    source: Annotated[Path, typer.Argument(help="Lot dir, dir of lot dirs, die table (.csv/.parquet) or WM-811K file.")],
    out: Annotated[Optional[Path], typer.Option("--out", help="Report root (default: infer.out).")] = None,
    model: Annotated[Optional[str], typer.Option("--model", help="Model URI or checkpoint path (default: @champion).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Re-report lots already reported by this model version.")] = False,
    params_path: ParamsOption = DEFAULT_PARAMS,
    profile: ProfileOption = None,
) -> None:
    """Predict every wafer of SOURCE and write per-lot reports plus a cross-lot index."""
    from pipeline.infer import infer as run_inference

    params = _params(params_path, profile)
    summary = run_inference(source, out or params.infer.out, params, model_uri=model, force=force, named=True)
    console.print(f"model {summary.model_version}: read {summary.read} wafers: reported {summary.reported}, "
                  f"quarantined {summary.quarantined}, skipped {summary.skipped} "
                  f"({summary.lots_reported} lots reported, {summary.lots_skipped} already current)")
    console.print(f"{summary.wafers_per_s:.1f} wafers/s end to end; dominant classes: {summary.class_mix}")
    console.print(f"index: {(out or params.infer.out) / 'index.html'}")


@app.command()
def report(
    out: Annotated[Optional[Path], typer.Argument(help="Report root written by `infer` (default: infer.out).")] = None,
    params_path: ParamsOption = DEFAULT_PARAMS,
) -> None:
    """Rebuild the cross-lot index.html of a report root from its complete lot reports."""
    from pipeline.report import write_index

    params = _params(params_path)
    console.print(f"index: {write_index(out or params.infer.out)}")


def main() -> None:
    try:
        app()
    except Exception as error:
        from pipeline.registry import RegistryError  # imported here: MLflow is slow to import
        from pipeline.report import ReportWriteError
        from pipeline.versioning import VersioningError

        if not isinstance(error, (WaferError, VersioningError, RegistryError, ReportWriteError)):
            raise
        console.print(f"[red]error:[/red] {error}")
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
