"""FCN-8s against its peers on the same generated data, at equal settings, on the CPU.

    nice -n 10 .venv/bin/python benchmarks/peers.py 2>&1 | tee benchmarks/results/peers.log
    .venv/bin/python benchmarks/peers.py --quick      # a few hundred wafers, 1 epoch: checks the script

One synthetic dataset (pipeline.synth + pipeline.dataset, split per lot) is written under --work. Every
learned model trains through pipeline.train.fit on the same train split, for the same epochs, seed, batch,
optimizer, schedule, augmentation and class-weighted cross-entropy over on-wafer dies, takes the same input
(pipeline.model.encode_maps, 3 channels), keeps its best-val-mIoU epoch (no early stop), and is scored by
pipeline.evaluate on the same test split. Peers: FCN-16s and FCN-32s (pipeline.model), a small U-Net
(below), torchvision's fcn_resnet50 and deeplabv3_mobilenet_v3_large (no pretrained weights), and the
rule-based benchmarks/classical.py. A paired bootstrap over test wafers gives the uncertainty of each peer's
mIoU difference to FCN-8s. Results are rewritten after every model (benchmarks/results/peers.json, .md);
--resume skips models already there for the same settings.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import shutil
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.segmentation import deeplabv3_mobilenet_v3_large, fcn_resnet50

import classical  # benchmarks/classical.py: a script's own folder is sys.path[0]
from pipeline import synth
from pipeline.dataset import WaferDataset, write_dataset
from pipeline.evaluate import evaluate_predictions
from pipeline.model import MAP_CHANNELS
from pipeline.params import Params, load_params, resolve_profile
from pipeline.predict import predict_wafers
from pipeline.train import fit
from pipeline.wafer import CLASS_NAMES, NUM_CLASSES, OFF_WAFER, Wafer

log = logging.getLogger("peers")
RESULTS = Path(__file__).parent / "results"
FCN_ARCHS = ("fcn8s", "fcn16s", "fcn32s")
LEARNED = (*FCN_ARCHS, "unet", "deeplabv3_mobilenet_v3_large", "fcn_resnet50")
ALL_MODELS = ("classical", *LEARNED)  # cheapest first: a cut-short run still has most of the table
GOAL_MARGIN = 0.01  # the goal: FCN-8s >= every learned peer - 0.01 mIoU
SPLIT = {"train": 0.7, "val": 0.1, "test": 0.2}  # per lot; a larger test split than params.yaml's, for steadier IoUs
NOTES = [
    "Every learned model uses the FCN-8s training recipe unchanged (AdamW, lr, poly schedule, batch, epochs); "
    "no per-model tuning, so a peer that wants another learning rate or more epochs is not at its best here.",
    "No pretrained weights anywhere: torchvision's backbones start from random init like the FCNs.",
    "The classical baseline's Rules defaults were set by hand on separately generated wafers (another seed), "
    "never on this test split; it needs no training.",
    "Inference wafers/s: predict_wafers (or classical.segment) over the test split after training, same batch "
    "size, fp32, channels_last as in training; best of the timed passes.",
]


# --- peers -----------------------------------------------------------------------------------


def double_conv(inputs: int, outputs: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inputs, outputs, 3, padding=1, bias=False), nn.BatchNorm2d(outputs), nn.ReLU(inplace=True),
        nn.Conv2d(outputs, outputs, 3, padding=1, bias=False), nn.BatchNorm2d(outputs), nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """Plain U-Net (Ronneberger et al. 2015) with BatchNorm: `depth` 2x poolings, `base` channels at full
    resolution, doubling per level; transposed-conv upsampling and concatenated skips. Inputs must be a
    multiple of 2**depth (pipeline.predict pads every batch to a multiple of 32)."""

    def __init__(self, base: int = 16, depth: int = 4):
        super().__init__()
        channels = [base * 2**level for level in range(depth + 1)]
        self.down = nn.ModuleList([double_conv(MAP_CHANNELS, channels[0])]
                                  + [double_conv(channels[i], channels[i + 1]) for i in range(depth)])
        self.up = nn.ModuleList([nn.ConvTranspose2d(channels[i + 1], channels[i], 2, stride=2)
                                 for i in reversed(range(depth))])
        self.merge = nn.ModuleList([double_conv(2 * channels[i], channels[i]) for i in reversed(range(depth))])
        self.score = nn.Conv2d(channels[0], NUM_CLASSES, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for level, block in enumerate(self.down):
            x = block(x if level == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        skips.pop()  # the bottleneck is x itself
        for up, merge in zip(self.up, self.merge):
            x = merge(torch.cat([skips.pop(), up(x)], dim=1))
        return self.score(x)


class TorchvisionSegmentation(nn.Module):
    """A torchvision segmentation model as a plain logits module (they return {'out': ...}).

    Their ResNet/MobileNet stems already take 3 channels, which is what encode_maps gives. A training batch
    of one wafer is run twice over: the ASPP image-pooling BatchNorm of DeepLabV3 cannot train on a single
    1x1 value per channel, and a size bucket can end in a batch of one."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] == 1:
            return self.network(torch.cat([x, x]))["out"][:1]
        return self.network(x)["out"]


PEER_BUILDERS: dict[str, Callable[[], nn.Module]] = {
    "unet": UNet,
    "deeplabv3_mobilenet_v3_large": lambda: TorchvisionSegmentation(deeplabv3_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=NUM_CLASSES, aux_loss=False)),
    "fcn_resnet50": lambda: TorchvisionSegmentation(fcn_resnet50(
        weights=None, weights_backbone=None, num_classes=NUM_CLASSES, aux_loss=False)),
}


# --- running one model -------------------------------------------------------------------------


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def per_wafer_confusion(wafers: Sequence[Wafer], predictions: Sequence[np.ndarray]) -> np.ndarray:
    """(n_wafers, 5, 5) die counts by (truth, prediction) over each wafer's on-wafer dies."""
    out = np.zeros((len(wafers), NUM_CLASSES, NUM_CLASSES), dtype=np.int64)
    for i, (wafer, prediction) in enumerate(zip(wafers, predictions)):
        on = wafer.map != OFF_WAFER
        flat = wafer.mask[on].astype(np.int64) * NUM_CLASSES + prediction[on]
        out[i] = np.bincount(flat, minlength=NUM_CLASSES**2).reshape(NUM_CLASSES, NUM_CLASSES)
    return out


def timed_predictions(predict: Callable[[Sequence[Wafer]], list[np.ndarray]], wafers: Sequence[Wafer],
                      repeats: int) -> tuple[list[np.ndarray], float]:
    """Predictions and the best wafers/s over `repeats` full passes, after a short warm-up."""
    predict(wafers[: min(len(wafers), 8)])
    best, predictions = math.inf, []
    for _ in range(repeats):
        started = time.perf_counter()
        predictions = predict(wafers)
        best = min(best, time.perf_counter() - started)
    return predictions, len(wafers) / best


def score(name: str, wafers: Sequence[Wafer], predictions: list[np.ndarray]) -> tuple[dict, np.ndarray]:
    confusion, metrics = evaluate_predictions(wafers, predictions)
    log.info("%s: test mIoU %.4f, defect mIoU %.4f, IoU %s", name, metrics["miou"], metrics["defect_miou"],
             " ".join(f"{n}={v:.3f}" for n, v in zip(CLASS_NAMES, metrics["iou"])))
    return {"miou": metrics["miou"], "defect_miou": metrics["defect_miou"],
            "pixel_accuracy": metrics["pixel_accuracy"], "iou": dict(zip(CLASS_NAMES, metrics["iou"])),
            "confusion": confusion.matrix.tolist()}, per_wafer_confusion(wafers, predictions)


def run_classical(test: Sequence[Wafer], repeats: int) -> tuple[dict, np.ndarray]:
    predictions, rate = timed_predictions(lambda ws: [classical.segment(w.map) for w in ws], test, repeats)
    record, per_wafer = score("classical", test, predictions)
    record.update(kind="rule-based (benchmarks/classical.py, default Rules)", parameters=0, infer_wafers_per_s=rate,
                  train_seconds=0.0, fit_wall_seconds=0.0, best_epoch=None, val_miou_history=[])
    return record, per_wafer


def run_learned(name: str, params: Params, dataset: WaferDataset, test: Sequence[Wafer],
                repeats: int) -> tuple[dict, np.ndarray]:
    model_params = params.model.model_copy(update={"arch": name}) if name in FCN_ARCHS else params.model
    train = params.train.model_copy(update={"checkpoint_dir": params.train.checkpoint_dir / name})
    params = params.model_copy(update={"model": model_params, "train": train})
    torch.manual_seed(params.seed)  # peers are built here, from the same seed fit uses for the FCNs
    model = None if name in FCN_ARCHS else PEER_BUILDERS[name]()
    log.info("=== %s: training for %d epochs ===", name, params.train.epochs)
    started = time.perf_counter()
    result = fit(params, dataset, model=model)
    fit_wall = time.perf_counter() - started
    shutil.rmtree(train.checkpoint_dir, ignore_errors=True)  # fcn_resnet50's last.pt with AdamW state is 0.4 GB
    tp = params.train
    predictions, rate = timed_predictions(
        lambda ws: predict_wafers(result.model, ws, tp.batch_wafers, result.device, False, tp.channels_last),
        test, repeats)
    record, per_wafer = score(name, test, predictions)
    kind = f"pipeline.model {name} width {params.model.width:g}" if name in FCN_ARCHS else {
        "unet": "U-Net (benchmarks/peers.py), base 16, depth 4, BatchNorm",
        "deeplabv3_mobilenet_v3_large": "torchvision deeplabv3_mobilenet_v3_large, no pretrained weights",
        "fcn_resnet50": "torchvision fcn_resnet50, no pretrained weights"}[name]
    record.update(kind=kind, parameters=parameter_count(result.model), infer_wafers_per_s=rate,
                  train_seconds=result.state.train_seconds, fit_wall_seconds=fit_wall,
                  train_wafers_per_s=result.state.wafers_seen / result.state.train_seconds,
                  best_epoch=result.state.best_epoch,
                  val_miou_history=[h["val_miou"] for h in result.state.history])
    log.info("%s: %d parameters, trained in %.0f s (%.0f s with validation), inference %.1f wafers/s",
             name, record["parameters"], record["train_seconds"], fit_wall, rate)
    return record, per_wafer


# --- comparison --------------------------------------------------------------------------------


def miou_of(matrices: np.ndarray) -> np.ndarray:
    """mIoU (NaN-skipping mean over classes, as compute_metrics) of each (..., 5, 5) matrix."""
    tp = np.diagonal(matrices, axis1=-2, axis2=-1).astype(np.float64)
    union = matrices.sum(axis=-2) + matrices.sum(axis=-1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
    return np.nanmean(iou, axis=-1)


def bootstrap_difference(reference: np.ndarray, other: np.ndarray, seed: int, draws: int = 2000) -> list[float]:
    """95% interval of mIoU(other) - mIoU(reference), resampling test wafers (paired)."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(reference), size=(draws, len(reference)))
    counts = np.stack([np.bincount(row, minlength=len(reference)) for row in picks]).astype(np.int64)
    ref = np.einsum("dw,wij->dij", counts, reference)
    oth = np.einsum("dw,wij->dij", counts, other)
    return [float(v) for v in np.percentile(miou_of(oth) - miou_of(ref), [2.5, 97.5])]


def compare(results: dict, per_wafer: dict[str, np.ndarray], seed: int) -> dict:
    if "fcn8s" not in results:
        return {}
    reference = results["fcn8s"]["miou"]
    rows = {}
    for name, record in results.items():
        if name == "fcn8s":
            continue
        row = {"miou_minus_fcn8s": record["miou"] - reference}
        if name in per_wafer and "fcn8s" in per_wafer:
            row["ci95"] = bootstrap_difference(per_wafer["fcn8s"], per_wafer[name], seed)
        rows[name] = row
    peers = [n for n in results if n in LEARNED and n != "fcn8s"]
    behind = [n for n in peers if reference < results[n]["miou"] - GOAL_MARGIN]
    return {"vs_fcn8s": rows, "learned_peers": peers, "goal_met": not behind if peers else None,
            "peers_ahead_beyond_margin": behind,
            "lead_over_classical": reference - results["classical"]["miou"] if "classical" in results else None}


# --- output ------------------------------------------------------------------------------------


def fmt(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def markdown(report: dict) -> str:
    s, results, comparison = report["settings"], report["results"], report["comparison"]
    lines = [
        "# FCN-8s against its peers (benchmarks/peers.py)", "",
        f"Run {report['finished']} on {s['machine']}, {s['torch_threads']} torch thread(s), fp32 on the CPU; "
        f"whole run {report['wall_seconds'] / 60:.0f} min. "
        "**The machine was shared with other workers**, so seconds and wafers/s are indicative only "
        "(ratios between models run minutes apart are noisy too).", "",
        "Settings, equal for every learned model: "
        f"{s['wafers']} synthetic wafers (seed {s['seed']}, {s['shape']}), split per lot "
        f"{s['split']['train']}/{s['split']['val']}/{s['split']['test']} train/val/test wafers; "
        f"{s['epochs']} epochs, batch {s['batch_wafers']}, {s['optimizer']} lr {s['lr']} with poly decay, "
        f"weight decay {s['weight_decay']}, rot90/flip augmentation, class-weighted cross-entropy over on-wafer "
        f"dies, best-val-mIoU epoch kept (no early stop); FCN width {s['width']:g} (dropout {s['dropout']}). "
        "Input: encode_maps one-hot (3 channels). Test metrics from pipeline.evaluate over all on-wafer dies "
        "of the test split; passing dies are background for every model.", "",
        "| model | mIoU | defect mIoU | " + " | ".join(CLASS_NAMES) + " | parameters | inference wafers/s "
        "| train s (loop) | fit s (with val) | best epoch |",
        "|---|" + "---:|" * (2 + len(CLASS_NAMES) + 5),
    ]
    for name, r in results.items():
        ious = " | ".join(fmt(r["iou"][c], 3) for c in CLASS_NAMES)
        lines.append(f"| {name} | {fmt(r['miou'])} | {fmt(r['defect_miou'])} | {ious} | {r['parameters']:,} | "
                     f"{r['infer_wafers_per_s']:.1f} | {r['train_seconds']:.0f} | {r['fit_wall_seconds']:.0f} | "
                     f"{r['best_epoch'] if r['best_epoch'] is not None else '-'} |")
    lines.append("")
    if comparison:
        lines += ["mIoU difference to FCN-8s (peer minus FCN-8s; 95% interval from a paired bootstrap over "
                  "test wafers):", ""]
        for name, row in comparison["vs_fcn8s"].items():
            interval = f" [{row['ci95'][0]:+.4f}, {row['ci95'][1]:+.4f}]" if "ci95" in row else ""
            lines.append(f"- {name}: {row['miou_minus_fcn8s']:+.4f}{interval}")
        lines.append("")
        if comparison["goal_met"] is not None:
            verdict = ("met" if comparison["goal_met"] else
                       "NOT met: " + ", ".join(f"{n} leads by {results[n]['miou'] - results['fcn8s']['miou']:.4f}"
                                               for n in comparison["peers_ahead_beyond_margin"]))
            lines.append(f"Goal (FCN-8s >= every learned peer - {GOAL_MARGIN} mIoU): **{verdict}**.")
        if comparison["lead_over_classical"] is not None:
            lead = comparison["lead_over_classical"]
            lines.append(f"FCN-8s is {'ahead of' if lead >= 0 else 'BEHIND'} the classical baseline by "
                         f"{abs(lead):.4f} mIoU.")
        lines.append("")
    curves = [f"- {name}: " + " ".join(f"{v:.3f}" for v in r["val_miou_history"])
              for name, r in results.items() if r["val_miou_history"]]
    if curves:
        lines += ["Validation mIoU after each epoch (still rising at the last epoch means the budget, not the "
                  "architecture, limits that model):", "", *curves, ""]
    if report.get("notes"):
        lines += ["Notes:", "", *[f"- {note}" for note in report["notes"]], ""]
    return "\n".join(lines)


def write_report(report: dict, results_dir: Path) -> None:
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "peers.json").write_text(json.dumps(report, indent=2, default=float) + "\n")
    (results_dir / "peers.md").write_text(markdown(report))


# --- main --------------------------------------------------------------------------------------


def parse_shape(text: str) -> tuple[int, int] | None:
    if text == "natural":
        return None
    rows, cols = (int(v) for v in text.lower().split("x"))
    return rows, cols


def benchmark_params(args: argparse.Namespace) -> Params:
    """params.yaml's CPU profile with the benchmark's settings; every model shares these."""
    base = resolve_profile(load_params(args.params), "cpu")
    data = base.model_dump(mode="json")
    data["seed"] = args.seed
    data["synth"]["size"]["fixed_shape"] = list(args.shape) if args.shape else None
    if args.width is not None:
        data["model"]["width"] = args.width
    data["dataset"]["split"] = SPLIT
    data["train"].update(epochs=args.epochs, batch_wafers=args.batch, early_stop_patience=args.epochs + 1,
                         device="cpu", amp="off", checkpoint_dir=str(args.work / "checkpoints"))
    return Params.model_validate(data)


def prepare_dataset(params: Params, args: argparse.Namespace) -> WaferDataset:
    shape = "x".join(map(str, args.shape)) if args.shape else "natural"
    root = args.work / f"data-n{args.wafers}-seed{args.seed}-{shape}-test{SPLIT['test']:g}"
    if not (root / "index.parquet").is_file():
        log.info("generating %d wafers (%s) into %s", args.wafers, shape, root)
        write_dataset(synth.generate(params.synth, seed=params.seed, n=args.wafers), root, params.dataset,
                      params.seed)
    return WaferDataset(root)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wafers", type=int, default=3000, help="synthetic wafers in all (default 3000)")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=32, help="wafers per batch, training and inference")
    parser.add_argument("--shape", type=parse_shape, default=None,
                        help="'natural' (params.yaml size mix, default) or ROWSxCOLS, e.g. 64x64")
    parser.add_argument("--width", type=float, default=None, help="FCN width (default: params.yaml CPU profile)")
    parser.add_argument("--models", default=",".join(ALL_MODELS), help=f"comma list of {', '.join(ALL_MODELS)}")
    parser.add_argument("--work", type=Path, default=Path("data/bench-peers"),
                        help="dataset and checkpoints (git-ignored)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared 2-core machine, 2 threads stall at every "
                             "parallel barrier whenever another process holds a core, 5-8x slower)")
    parser.add_argument("--repeats", type=int, default=2, help="timed inference passes; the best counts")
    parser.add_argument("--resume", action="store_true", help="keep models already in peers.json (same settings)")
    parser.add_argument("--quick", action="store_true", help="200 wafers, 1 epoch, results under --work")
    args = parser.parse_args()
    if args.quick:
        args.wafers, args.epochs, args.repeats = 200, 1, 1
        args.results = args.work / "quick-results"
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = set(models) - set(ALL_MODELS)
    if unknown:
        parser.error(f"unknown models {sorted(unknown)}; choose from {', '.join(ALL_MODELS)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)

    params = benchmark_params(args)
    dataset = prepare_dataset(params, args)
    test = list(dataset.wafers("test"))
    split = {s: int((dataset.index["split"] == s).sum()) for s in ("train", "val", "test")}
    settings = {"wafers": args.wafers, "shape": "x".join(map(str, args.shape)) if args.shape else "natural size mix",
                "seed": args.seed, "split": split, "epochs": args.epochs, "batch_wafers": args.batch,
                "optimizer": params.train.optimizer, "lr": params.train.lr,
                "weight_decay": params.train.weight_decay, "width": params.model.width,
                "dropout": params.model.dropout, "channels_last": params.train.channels_last,
                "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                "machine": f"{platform.machine()} {platform.processor() or ''}".strip() + " (2 cores)"}
    log.info("settings: %s", json.dumps(settings))

    results: dict = {}
    per_wafer: dict[str, np.ndarray] = {}
    saved = args.results / "peers.json"
    earlier_seconds = 0.0  # of the run being resumed
    if args.resume and saved.is_file():
        previous = json.loads(saved.read_text())
        if previous.get("settings") == settings:
            earlier_seconds = previous.get("wall_seconds", 0.0)
            for name, record in previous["results"].items():
                cached = args.work / "per-wafer" / f"{name}.npy"
                if name in models and cached.is_file():
                    results[name], per_wafer[name] = record, np.load(cached)
                    log.info("resume: keeping %s (test mIoU %.4f)", name, record["miou"])
        else:
            log.info("resume: %s has other settings, starting over", saved)

    started = time.perf_counter()
    report = {"settings": settings, "notes": NOTES}

    def publish() -> None:
        report.update(results={n: results[n] for n in ALL_MODELS if n in results},
                      comparison=compare(results, per_wafer, args.seed),
                      finished=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                      wall_seconds=round(earlier_seconds + time.perf_counter() - started, 1))
        write_report(report, args.results)

    for name in models:
        if name in results:
            continue
        if name == "classical":
            record, matrices = run_classical(test, args.repeats)
        else:
            record, matrices = run_learned(name, params, dataset, test, args.repeats)
        results[name], per_wafer[name] = record, matrices
        (args.work / "per-wafer").mkdir(parents=True, exist_ok=True)
        np.save(args.work / "per-wafer" / f"{name}.npy", matrices)
        publish()
        log.info("wrote %s after %s (%.1f min so far)", args.results / "peers.md", name,
                 (time.perf_counter() - started) / 60)
    publish()
    print(markdown(report))


if __name__ == "__main__":
    main()
