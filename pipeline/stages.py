"""The pipeline's stages, one function each: what `waferseg <stage>` (and so each `dvc.yaml` stage) and the
Prefect flows run. Each takes the typed params and calls the library modules below it; `infer` is
`pipeline.infer.infer` (reading lots, batching across them and writing reports is that module's one concern).

generate -> split -> train (fit, score, log to MLflow, register, gate), the dvc.yaml DAG; evaluate and
evaluate_real score any model by hand; infer reports lots with the champion.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch

from pipeline import checkpoint, dataset, distributed, io, labels, real_eval, realdata, registry, synth, viz
from pipeline.dataset import WaferDataset
from pipeline.device import select_device, use_amp
from pipeline.evaluate import evaluate_model, evaluate_real as score_real, evaluate_split, headline_metrics
from pipeline.model import build_model
from pipeline.params import Params
from pipeline.train import TrainState, fit, masked_wafers, write_history
from pipeline.versioning import dvc_md5, training_set_version
from pipeline.wafer import Wafer, WaferError

log = logging.getLogger(__name__)

TRAIN_SUMMARY = "train_summary.json"  # in train.reports_dir: what the last train stage did (run, version, gate)


def generate(params: Params, n: int | None = None, out: Path | None = None, seed: int | None = None
             ) -> tuple[pd.DataFrame, Path]:
    """The `generate` stage: synth.n_wafers synthetic labelled wafers (deterministic in the seed) written as a
    sharded dataset, and a preview image of a few of them. Returns the dataset's index and the preview."""
    seed = params.seed if seed is None else seed
    n = params.synth.n_wafers if n is None else n
    out = params.dataset.synthetic_dir if out is None else Path(out)
    index = dataset.write_dataset(synth.generate(params.synth, seed=seed, n=n), out, params.dataset, seed)
    return index, viz.preview_dataset(WaferDataset(out), params.preview)


def split(params: Params, out: Path | None = None) -> pd.DataFrame:
    """The `split` stage: the synthetic set and the real labelled store merged into the training dataset,
    split per lot (a lot never spans two splits)."""
    return dataset.merge_datasets([params.dataset.synthetic_dir, params.data.store], out or params.dataset.dir,
                                  params.dataset, params.seed)


def _flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    flat: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def warm_start(params: Params, device: torch.device) -> tuple[torch.nn.Module | None, str | None]:
    """The champion's weights (or, with no champion yet, train.init_weights) when their architecture is the one
    params.model builds (same layers and shapes), else (None, None): training then starts from scratch."""
    champion = registry.current_champion(params.registry.model_name)
    if champion is not None:
        uri = f"models:/{params.registry.model_name}/{champion}"
    elif params.train.init_weights is not None:
        if not params.train.init_weights.is_file():
            raise FileNotFoundError(f"{params.train.init_weights}: no such weights file "
                                    "(train.init_weights; null starts from scratch)")
        uri = str(params.train.init_weights)
    else:
        return None, None
    loaded, label = registry.load_model(uri, params.registry, device)
    fresh = build_model(params.model)
    theirs = loaded.state_dict()
    if {k: v.shape for k, v in fresh.state_dict().items()} != {k: v.shape for k, v in theirs.items()}:
        log.info("warm start: %s has another architecture; training from scratch", label)
        return None, None
    fresh.load_state_dict(theirs)
    log.info("warm start from %s", label)
    return fresh, label


def train(params: Params, dataset_dir: Path, resume: bool = False, out_dir: Path | None = None,
          from_scratch: bool = False) -> dict:
    """The `train` stage: fit (warm-started from the champion unless from_scratch or train.warm_start is off),
    score val and test (synthetic mIoU; real WM-811K and MixedWM38 wafer-level scores), log it all to one
    MLflow run, register the model and let the gate decide whether it becomes champion."""
    training_set = WaferDataset(dataset_dir)
    real = realdata.load_real_sets(params.real)
    fit_real = {name: {"train": splits["train"], "val": splits["val"]} for name, splits in real.items()}
    if not distributed.from_env().is_main:  # other torchrun ranks train alongside rank 0, which alone records
        fit(params, training_set, resume=resume, real=fit_real)
        return {}
    out_dir = Path(out_dir or params.train.reports_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    registry.configure(params.registry)
    # The DVC md5 of data/ names the labelled data; the content hash names the exact split trained on.
    version = dvc_md5(params.data) or "untracked"
    content_hash = training_set_version(dataset_dir, params.real)
    warm, warm_label = (None, None)
    if params.train.warm_start and not from_scratch and not resume:
        warm, warm_label = warm_start(params, select_device(params.train.device))

    def start(state: TrainState) -> None:
        run = registry.start_run(run_id=state.run_id, log_system_metrics=params.registry.system_metrics)
        state.run_id = run.info.run_id
        if not resume or not state.history:
            registry.log_params(_flatten(params.model_dump(mode="json")))
            registry.log_params({"dataset.version": version, "dataset.content_hash": content_hash,
                               "dataset.path": str(dataset_dir), "warm_start": warm_label or "none",
                               **{f"dataset.{s}_wafers": int((training_set.index["split"] == s).sum())
                                  for s in ("train", "val", "test")},
                               **{f"real.{name}.{s}_wafers": len(w) for name, splits in real.items()
                                  for s, w in splits.items()}})
            registry.set_tags({"dataset_version": version, "profile": params.profile})

    try:
        result = fit(params, training_set, resume=resume, on_start=start, model=warm, real=fit_real,
                     on_epoch=lambda epoch, record: registry.log_metrics(record, step=epoch))
        model, device, amp, tp = result.model, result.device, result.amp, params.train
        test_wafers = masked_wafers(training_set, "test")
        confusion, metrics, plots = evaluate_split(model, test_wafers, out_dir, "test", params.infer.batch_wafers, device,
                                                   amp, tp.channels_last)
        real_scores = {split: score_real(model, {n: s[split] for n, s in real.items()}, params, device, amp)
                       for split in ("val", "test")}
        plots += real_eval.write_real_reports(real_scores, out_dir)
        test_metrics = {f"test_{k}": v for k, v in metrics.items() if isinstance(v, float)}
        # per-epoch `val_<set>_*` curves score a val sample before calibration; these score all of val after it
        prefixes = {"val": "calibrated_val", "test": "test"}
        real_metrics = {k: v for split, by_set in real_scores.items() for name, scores in by_set.items()
                        for k, v in real_eval.flat_metrics(scores, f"{prefixes[split]}_{name}").items()}
        checkpoint.save_model(tp.model_out, model, params)
        write_history(result.state.history, out_dir / "history.csv")
        (out_dir / "metrics.json").write_text(json.dumps(
            {"test": headline_metrics(metrics), "best_epoch": result.state.best_epoch,
             "best_val_score": round(result.state.best_score, 6),
             "real": {split: {name: real_eval.headline(scores) for name, scores in by_set.items()}
                      for split, by_set in real_scores.items()},
             "calibration": {k: round(v, 6) for k, v in result.calibration.items()}}, indent=2))
        registry.log_metrics({**test_metrics, **real_metrics, **result.calibration})
        registry.log_metrics({"best_epoch": result.state.best_epoch, "epochs_run": result.state.epoch,
                            "train_wafers_per_s_overall": result.state.wafers_seen / result.state.train_seconds})
        for plot in plots:
            registry.log_artifact(str(plot), "plots")
        registry.log_dict({"matrix": confusion.matrix.tolist(), "metrics": metrics}, "metrics/test_confusion.json")
        registry.log_dict(real_scores, "metrics/real_scores.json")
        example = np.stack([test_wafers[0].map])
        registry.log_weights(tp.model_out)
        model_version = registry.log_and_register_model(model, example, params.registry.model_name)

        synthetic_val = masked_wafers(training_set, "val")
        real_val = {name: splits["val"] for name, splits in real.items()}
        challenger = {"synthetic_miou": registry.Score(val_miou(model, synthetic_val, params, device, amp),
                                                       params.registry.miou_noise),
                      **gate_scores(real_scores["val"])}

        def champion_scores(uri: str) -> dict:
            champion, _ = registry.load_model(uri, params.registry, device)
            return {"synthetic_miou": registry.Score(val_miou(champion, synthetic_val, params, device, amp),
                                                     params.registry.miou_noise),
                    **gate_scores(score_real(champion, real_val, params, device, amp))}

        decision = registry.gate(params.registry.model_name, model_version, challenger, champion_scores,
                                 params.registry.gate_sigmas)
        registry.set_tags({"gate": decision.describe()})
        registry.log_metrics({"gate_promoted": float(decision.promoted),
                            **{f"champion_val_{k}": v.value for k, v in (decision.champion or {}).items()}})
        summary = {"run_id": result.state.run_id, "model_version": model_version, "dataset_version": version,
                   "warm_start": warm_label, "promoted": decision.promoted, "gate": decision.describe(),
                   "best_epoch": result.state.best_epoch, "epochs_run": result.state.epoch,
                   "stopped_early": result.stopped_early, "train_seconds": round(result.state.train_seconds, 1),
                   "train_wafers_per_s": round(result.state.wafers_seen / result.state.train_seconds, 1),
                   **test_metrics, **real_metrics}
        (out_dir / TRAIN_SUMMARY).write_text(json.dumps(summary, indent=2, default=float))
        return summary
    finally:
        mlflow.end_run()


def val_miou(model, wafers: list[Wafer], params: Params, device: torch.device, amp: bool) -> float:
    tp = params.train
    return evaluate_model(model, wafers, params.infer.batch_wafers, device, amp, tp.channels_last)[1]["miou"]


def gate_scores(real_scores: dict[str, dict]) -> dict:
    return {name: registry.Score(real_eval.main_score(s), real_eval.main_score_noise(s)) for name, s in real_scores.items()}


def evaluate_real(model_uri: str, params, split: str, out_dir: Path, sources: Sequence[Path] | None = None) -> str:
    """The `evaluate_real` stage: a model's wafer-level scores on one split of the shipped real sets (or on
    every wafer of labelled `sources`), written as metrics.json, real_scores.md and plots; returns the tables."""
    device = select_device(params.train.device)
    model, version = registry.load_model(model_uri, params.registry, device)
    if sources:
        wafers = [w for source in sources for w in io.read_wafers(source, named=True)]
        unlabelled = [w for w in wafers if w.label is None]
        if unlabelled:
            first = unlabelled[0]
            raise WaferError(first.source, "no wafer-level label (failure_type) to score against", first.lot_id,
                             first.wafer_id)
        single = all(len(labels.parse_label(w.label)) <= 1 for w in wafers)
        # single-label data is scored both ways: by dominant class (WM-811K) and by pattern set
        real = {"wm811k": wafers, "mixedwm38": wafers} if single else {"mixedwm38": wafers}
        split = "source"
    else:
        real = {name: splits[split] for name, splits in realdata.load_real_sets(params.real).items()}
    scores = {split: score_real(model, real, params, device, use_amp(params.train, device))}
    out_dir = Path(out_dir)
    real_eval.write_real_reports(scores, out_dir)
    (out_dir / "metrics.json").write_text(json.dumps(
        {"model": version, split: {name: real_eval.headline(s) for name, s in scores[split].items()}}, indent=2))
    return (out_dir / "real_scores.md").read_text()


def evaluate(model_uri: str, dataset_dir: Path, split: str, out_dir: Path, params) -> dict:
    """The `evaluate` stage: a registered or checkpointed model on one split of a dataset, with plots."""
    device = select_device(params.train.device)
    model, version = registry.load_model(model_uri, params.registry, device)
    wafers = [w for w in WaferDataset(dataset_dir).wafers(split) if w.mask is not None]  # mIoU needs die truth
    confusion, metrics, _ = evaluate_split(model, wafers, out_dir, split, params.infer.batch_wafers, device,
                                           use_amp(params.train, device), params.train.channels_last,
                                           title=f"{version} on {split}")
    (Path(out_dir) / f"metrics_{split}.json").write_text(json.dumps(
        {"model": version, "dataset": str(dataset_dir), "split": split, "wafers": len(wafers),
         "confusion": confusion.matrix.tolist(), **metrics}, indent=2, default=float))
    (Path(out_dir) / "metrics.json").write_text(json.dumps({split: headline_metrics(metrics)}, indent=2))
    return metrics
