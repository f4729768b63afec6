"""params.yaml, the single source of configuration, as typed models.

Every section forbids unknown keys, so a typo fails loudly with the key's dotted path.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.atomic import atomic_file

DEFAULT_PARAMS = Path("params.yaml")

Probability = Annotated[float, Field(ge=0.0, le=1.0)]
Fraction = Annotated[float, Field(gt=0.0, lt=1.0)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Range(Section):
    """A closed interval [lo, hi] a generator draws uniformly from."""

    lo: float
    hi: float

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if self.lo > self.hi:
            raise ValueError(f"lo ({self.lo}) is greater than hi ({self.hi})")
        return self


# --- synthetic generator (pipeline/synth.py) -------------------------------------------------
# Lengths are in normalised wafer units: the on-wafer ellipse inscribed in the die grid is the unit
# circle, so 1.0 is the wafer radius whatever the grid's size or aspect.


class SizeParams(Section):
    """Die-grid size: the longer side is log-normal, the aspect ratio (rows/cols) normal; both clipped.

    `fixed_shape` (rows, cols) replaces the draw, e.g. for benchmarks or fixed-size training sets.
    """

    side_median: float = Field(40.0, gt=0)
    side_log_sigma: float = Field(0.3, ge=0)
    side_min: int = Field(22, ge=4)
    side_max: int = Field(212, ge=4)
    aspect_mean: float = Field(1.05, gt=0)
    aspect_sigma: float = Field(0.08, ge=0)
    aspect_min: float = Field(0.7, gt=0)
    aspect_max: float = Field(1.4, gt=0)
    fixed_shape: tuple[Annotated[int, Field(ge=4)], Annotated[int, Field(ge=4)]] | None = None

    @model_validator(mode="after")
    def _ordered(self) -> SizeParams:
        if self.side_min > self.side_max:
            raise ValueError(f"side_min ({self.side_min}) is greater than side_max ({self.side_max})")
        if self.aspect_min > self.aspect_max:
            raise ValueError(f"aspect_min ({self.aspect_min}) is greater than aspect_max ({self.aspect_max})")
        return self


class EdgeCutParams(Section):
    """Flat (a chord cut off the wafer) or notch (a small bite at the edge), one side of four, per lot.

    Either reaches at least `cut_min_dies` die pitches in from the edge, so that it removes dies.
    """

    p_flat: Probability = 0.25
    flat_depth: Range = Range(lo=0.03, hi=0.08)
    p_notch: Probability = 0.25
    notch_radius: Range = Range(lo=0.04, hi=0.08)
    cut_min_dies: float = Field(1.0, gt=0)

    @model_validator(mode="after")
    def _exclusive(self) -> EdgeCutParams:
        if self.p_flat + self.p_notch > 1.0 + 1e-9:
            raise ValueError(f"p_flat + p_notch must be at most 1, got {self.p_flat + self.p_notch:.4f}")
        return self


class BackgroundParams(Section):
    """Random fails: a base rate (log-normal), optionally clustered, rising towards the edge.

    Clustering multiplies the rate by exp(cluster_strength * smooth noise), the noise being a
    `cluster_cells` x `cluster_cells` Gaussian grid interpolated to the die grid (renormalised to keep
    the mean rate); the edge effect multiplies it by 1 + edge_boost * exp(-(1 - radius) / edge_decay),
    as in WM-811K, where the outermost dies fail about 3.5 times as often as the interior ones.
    """

    fail_median: Fraction = 0.05
    fail_log_sigma: float = Field(0.5, ge=0)
    fail_max: Fraction = 0.5
    p_clustered: Probability = 0.5
    cluster_cells: int = Field(6, ge=2)
    cluster_strength: float = Field(1.0, ge=0)
    edge_decay: float = Field(0.055, gt=0)
    edge_boost: Range = Range(lo=3.0, hi=8.0)


class RingParams(Section):
    """Edge ring (band of width `edge_width` inside the edge) or donut (annulus); optionally an arc."""

    p_donut: Probability = 0.2
    edge_width: Range = Range(lo=0.04, hi=0.15)
    donut_radius: Range = Range(lo=0.35, hi=0.7)
    donut_width: Range = Range(lo=0.08, hi=0.2)
    p_partial: Probability = 0.5
    arc_span_deg: Range = Range(lo=90.0, hi=300.0)
    density: Range = Range(lo=0.3, hi=0.9)


class ScratchParams(Section):
    """A polyline of `segments` straight pieces, `length` long in all, starting inside `start_radius`.

    It is rasterised by sampling points every `step_dies` die pitches; a wide scratch is two dies wide.
    """

    segments: Range = Range(lo=1, hi=4)
    length: Range = Range(lo=0.3, hi=1.2)
    turn_deg: Range = Range(lo=-35.0, hi=35.0)
    start_radius: float = Field(0.9, gt=0)
    step_dies: float = Field(0.5, gt=0)
    p_wide: Probability = 0.4
    density: Range = Range(lo=0.75, hi=1.0)


class LocalZoneParams(Section):
    """A blob of radius `radius` whose outline wobbles by up to `irregularity` (relative) through
    `harmonics` angular harmonics; with p_edge its centre lies at `edge_centre_radius`, otherwise
    uniformly inside `interior_radius`."""

    p_edge: Probability = 0.6
    edge_centre_radius: Range = Range(lo=0.8, hi=1.0)
    interior_radius: float = Field(0.75, gt=0)
    radius: Range = Range(lo=0.08, hi=0.3)
    irregularity: Range = Range(lo=0.1, hi=0.45)
    harmonics: int = Field(3, ge=1)
    density: Range = Range(lo=0.3, hi=0.9)

    @model_validator(mode="after")
    def _positive_outline(self) -> LocalZoneParams:
        if self.irregularity.lo < 0 or self.irregularity.hi >= 1:
            raise ValueError("irregularity must lie in [0, 1) so the outline stays positive")
        return self


class CircleParams(Section):
    """A filled disc around the centre; its centre is offset by N(0, centre_jitter) on each axis."""

    radius: Range = Range(lo=0.1, hi=0.4)
    centre_jitter: float = Field(0.08, ge=0)
    density: Range = Range(lo=0.3, hi=0.9)


class PatternParams(Section):
    """How many patterns a wafer carries (probabilities of 0..3) and which kinds (relative weights; a kind
    left out of kind_weights is never drawn). The same kind may be drawn twice on one wafer."""

    count_probs: tuple[Probability, Probability, Probability, Probability] = (0.3, 0.4, 0.2, 0.1)
    kind_weights: dict[str, float] = {"ring": 1.0, "scratch": 1.0, "local_zone": 1.0, "circle": 1.0}
    ring: RingParams = RingParams()
    scratch: ScratchParams = ScratchParams()
    local_zone: LocalZoneParams = LocalZoneParams()
    circle: CircleParams = CircleParams()

    @model_validator(mode="after")
    def _valid(self) -> PatternParams:
        if abs(sum(self.count_probs) - 1.0) > 1e-6:
            raise ValueError(f"count_probs must sum to 1, got {sum(self.count_probs):.4f}")
        unknown = set(self.kind_weights) - {"ring", "scratch", "local_zone", "circle"}
        if unknown:
            raise ValueError(f"kind_weights has unknown pattern kinds {sorted(unknown)}")
        if any(weight < 0 for weight in self.kind_weights.values()):
            raise ValueError("kind_weights must not be negative")
        if self.count_probs[0] < 1.0 and sum(self.kind_weights.values()) <= 0:
            raise ValueError("kind_weights must have a positive weight when wafers can carry patterns")
        return self


class SynthParams(Section):
    n_wafers: int = Field(4000, gt=0)
    wafers_per_lot: int = Field(25, gt=0)
    lot_prefix: str = "SYN"
    size: SizeParams = SizeParams()
    edge_cut: EdgeCutParams = EdgeCutParams()
    background: BackgroundParams = BackgroundParams()
    patterns: PatternParams = PatternParams()


# --- dataset storage (pipeline/dataset.py) ---------------------------------------------------


class SplitParams(Section):
    train: Fraction = 0.8
    val: Fraction = 0.1
    test: Fraction = 0.1

    @model_validator(mode="after")
    def _sums_to_one(self) -> SplitParams:
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + val + test must be 1, got {total:.4f}")
        return self


class DatasetParams(Section):
    """`generate` writes the synthetic set to synthetic_dir; `split` merges it with the real labelled data
    under DVC (data.store) into `dir`, the dataset training reads, split per lot."""

    synthetic_dir: Path = Path("build/synthetic")
    dir: Path = Path("build/dataset")
    shard_wafers: int = Field(4096, gt=0)
    split: SplitParams = SplitParams()


# --- labelled data under DVC (pipeline/versioning.py) -----------------------------------------


class DataParams(Section):
    """Real labelled wafers: dropped into `inbox`, merged into `store` inside `root`, which data.dvc
    tracks; each change is `dvc add`ed, pushed to `remote` and (in a git work tree) committed."""

    root: Path = Path("data")
    store: Path = Path("data/labelled")
    inbox: Path = Path("inbox/labelled")
    ingested: Path = Path("inbox/ingested")  # merged inbox entries move here; nothing is deleted
    quarantine: Path = Path("inbox/quarantine")
    remote: str = "local"
    lock_timeout_s: float = Field(120.0, ge=0)
    command_timeout_s: float = Field(900.0, gt=0)  # a dvc add/push/pull that runs longer is stopped (a hung remote)
    git_commit: bool = True

    @model_validator(mode="after")
    def _store_inside_root(self) -> DataParams:
        if self.root not in self.store.parents:
            raise ValueError(f"data.store ({self.store}) must lie inside data.root ({self.root}), which DVC tracks")
        return self


# --- real labelled sets shipped in real_data/ (pipeline/realdata.py) ---------------------------


class RealSetParams(Section):
    """One real labelled wafer table, and how much of its train split one epoch draws, per label."""

    path: Path
    per_label: int | None = Field(None, gt=0)  # at most this many wafers of a label per epoch (None: all)
    min_per_label: int = Field(0, ge=0)  # rarer labels are drawn up to this many, with replacement
    val_wafers: int | None = Field(None, gt=0)  # per-epoch model selection on this many val wafers (None: all)


class RealParams(Section):
    """Splits are fixed per map (realdata.split_of_map) and recorded in splits_dir; test is never trained
    or tuned on. `wm811k` is scored by balanced accuracy, `mixedwm38` by exact pattern-set match."""

    sets: dict[Literal["wm811k", "mixedwm38"], RealSetParams] = {
        "wm811k": RealSetParams(path=Path("real_data/wm811k/wm811k_labelled.parquet"), per_label=800,
                                min_per_label=400, val_wafers=2000),
        "mixedwm38": RealSetParams(path=Path("real_data/mixedwm38/mixedwm38.parquet"), per_label=160,
                                   min_per_label=80, val_wafers=1000),
    }
    splits_dir: Path = Path("real_data/splits")
    split: SplitParams = SplitParams(train=0.7, val=0.15, test=0.15)
    reports_dir: Path = Path("reports/real")


class PatternsParams(Section):
    """The wafer-level decision (pipeline/patterns.py): per-class offsets on the score margins, one set to
    decide which classes are present and one for which present class claims each die, calibrated on real val
    after training and saved with the model; `offsets` (and `claim_offsets`, else the same values) here
    override them. A class also needs infer.min_pattern_dies dies in the decided mask to be in `patterns`."""

    offsets: tuple[float, float, float, float] | None = None  # ring, scratch, local_zone, circle
    claim_offsets: tuple[float, float, float, float] | None = None
    offset_grid: tuple[float, float, int] = (-4.0, 4.0, 17)  # calibration: lo, hi, steps per class
    calibration_rounds: int = Field(2, ge=1)
    # true: also a claim delta per class (which present class takes the dies); false: one offset for both.
    # Off: the deltas it found cost synthetic mIoU (benchmarks/results/decision-rule.md)
    calibrate_claims: bool = False
    # true: the objective also averages in the synthetic val mIoU of the decided masks (the selection score's
    # parts). Off: on the shipped weights it gave 0.025 of mIoU for 0.009 of WM-811K balanced accuracy
    calibrate_masks: bool = False
    # calibration keeps WM-811K val false alarms at or below this (null: no limit), each unit above it costing
    # false_alarm_penalty of the objective (real_eval.calibration_objective)
    max_false_alarms: Probability | None = 0.05
    false_alarm_penalty: float = Field(10.0, ge=0)

    @model_validator(mode="after")
    def _claims_need_offsets(self) -> PatternsParams:
        if self.claim_offsets is not None and self.offsets is None:
            raise ValueError("claim_offsets needs offsets: either both come from params or both are calibrated")
        return self


class PreviewParams(Section):
    path: Path = Path("reports/preview.png")
    n_wafers: int = Field(8, gt=0)


# --- model (pipeline/model.py) ---------------------------------------------------------------


class ModelParams(Section):
    """FCN on a VGG16 encoder; width scales every channel count (1.0 = the paper's 64..512, fc 4096)."""

    arch: Literal["fcn8s", "fcn16s", "fcn32s"] = "fcn8s"
    width: float = Field(0.125, gt=0)
    dropout: Probability = 0.1
    # Wafer-level presence is the log-mean-exp of a class's score margins over the failing dies, with this
    # sharpness: higher comes closer to the max, lower to the mean (model.presence_logits).
    presence_sharpness: float = Field(4.0, gt=0)
    # BatchNorm after each encoder conv (torchvision's vgg16_bn): trains from scratch in a few epochs, where
    # the plain VGG16 (the paper starts from ImageNet weights, which wafer maps cannot use) needs dozens.
    batch_norm: bool = True
    global_context: bool = True  # a per-wafer class score from fc7 averaged over the map, added to every die's


# --- training (pipeline/train.py) and the registry (pipeline/registry.py) ---------------------


class TrainParams(Section):
    epochs: int = Field(6, gt=0)
    batch_wafers: int = Field(16, gt=0)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)  # sgd only
    poly_power: float = Field(0.9, ge=0)  # lr * (1 - step/steps) ** power, both optimizers
    # Class weights (1 / frequency) ** power over the train split's on-wafer dies, capped.
    class_weight_power: float = Field(0.5, ge=0)
    class_weight_cap: float = Field(20.0, ge=1)
    early_stop_patience: int = Field(4, ge=1)
    # Loss = class-weighted die cross-entropy (synthetic masks; all-background masks of real wafers labelled
    # none/Random/Near-full) + presence_weight * BCE of the pooled presence against each wafer's label set.
    presence_weight: float = Field(1.0, ge=0)
    partial_weight: float = Field(1.0, ge=0)  # the partial-label die loss of wafers known by their label
    synthetic_per_epoch: int | None = Field(1200, gt=0)  # synthetic train wafers drawn per epoch (None: all)
    warm_start: bool = True  # start from the champion's weights when its architecture matches
    init_weights: Path | None = Path("pretrained/fcn8s-cpu-full.pt")  # without a champion, start from these (None: scratch)
    augment: bool = True
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: Literal["auto", "off", "bf16"] = "auto"
    channels_last: bool = True
    checkpoint_dir: Path = Path("checkpoints")
    model_out: Path = Path("models/fcn8s.pt")  # the selected weights, a DVC output
    reports_dir: Path = Path("reports/train")


class RegistryParams(Section):
    tracking_uri: str = "sqlite:///mlflow.db"  # MLFLOW_TRACKING_URI overrides
    artifact_dir: Path = Path("mlartifacts")
    experiment: str = "waferseg"
    model_name: str = "wafer-fcn8s"
    system_metrics: bool = True
    lock_retries: int = Field(4, ge=0)  # a tracking DB locked by another writer: tries after the first
    lock_backoff_s: float = Field(2.0, ge=0)  # first wait; doubled after each locked try
    # The gate: a challenger losing any score by more than gate_sigmas standard errors stays challenger.
    gate_sigmas: float = Field(2.0, ge=0)
    miou_noise: float = Field(0.005, ge=0)  # standard error taken for synthetic val mIoU
    # Load a registry model that has no weights-only checkpoint (a `runs:/` URI, an old or odd version) from
    # MLflow's pickle, which runs code from the registry: only when the user trusts its source.
    allow_pickled_models: bool = False


# --- batch inference and reports (pipeline/infer.py, pipeline/report.py) ---------------------


class InferParams(Section):
    model_uri: str = "models:/wafer-fcn8s@champion"
    inbox: Path = Path("inbox/lots")  # new lots arrive here (lot dirs of .npy wafers, die tables)
    out: Path = Path("reports/lots")
    batch_wafers: int = Field(64, gt=0)
    batch_pixels: int = Field(262_144, gt=0)  # padded dies per batch at most: large maps go in smaller batches
    chunk_wafers: int = Field(512, gt=0)  # predicted together, across lots, before reports are handed on
    read_ahead_wafers: int = Field(2048, gt=0)
    amp: bool = True  # bf16 autocast: measured faster on AMX CPUs and on CUDA (benchmarks/)
    channels_last: bool = True
    # A defect class needs at least this many dies on a wafer to count as that wafer's pattern.
    min_pattern_dies: int = Field(1, ge=1)
    # A wafer table without lot_id: consecutive wafers form lots of this many (contract, input format 3).
    wafer_table_lot_wafers: int = Field(25, gt=0)
    # CPU threads for the model, each predicting its own batches single-threaded (infer.model_streams); null: one
    # per core. Side by side they beat one batch on as many OpenMP threads beside the report threads (README).
    model_threads: int | None = Field(None, gt=0)


class ReportParams(Section):
    die_px: int = Field(5, ge=1)
    gap_px: int = Field(1, ge=0)
    max_image_px: int = Field(1200, gt=0)  # a larger map is drawn with smaller dies (down to 1 pixel, no gap)


class FlowParams(Section):
    """The Prefect flows (flows/): where an empty lots inbox is filled from, and task retries and timeouts."""

    seed_lots: Path | None = Path("real_data/wm811k/unlabeled_lots.parquet")
    retries: int = Field(2, ge=0)  # for I/O and registry tasks; training is not retried
    retry_delay_s: float = Field(5.0, ge=0)
    io_timeout_s: float = Field(900.0, gt=0)
    train_timeout_s: float = Field(7200.0, gt=0)
    infer_timeout_s: float = Field(7200.0, gt=0)
    dask_address: str | None = None  # infer_lots --runner dask: an existing scheduler, else a LocalCluster
    dask_workers: int = Field(2, gt=0)
    workspace_lock: Path = Path("build/nightly.lock")  # held for a whole nightly run: a second one is refused


class Profile(Section):
    """Overrides merged onto the base sections when the profile is active (base = the CPU setting)."""

    synth: dict[str, Any] = {}
    dataset: dict[str, Any] = {}
    model: dict[str, Any] = {}
    train: dict[str, Any] = {}
    real: dict[str, Any] = {}


ProfileName = Literal["cpu", "full", "gpu"]
# Paths dvc.yaml declares as stage outputs: DVC reads them from the base sections, so no profile may move them.
PIPELINE_PATHS = {"dataset": ("synthetic_dir", "dir"), "train": ("model_out", "reports_dir"), "real": ("reports_dir",)}


class Params(Section):
    seed: int = 0
    profile: Literal["auto", "cpu", "full", "gpu"] = "auto"  # auto: gpu when CUDA is available
    synth: SynthParams = SynthParams()
    dataset: DatasetParams = DatasetParams()
    data: DataParams = DataParams()
    preview: PreviewParams = PreviewParams()
    real: RealParams = RealParams()
    patterns: PatternsParams = PatternsParams()
    model: ModelParams = ModelParams()
    train: TrainParams = TrainParams()
    registry: RegistryParams = RegistryParams()
    infer: InferParams = InferParams()
    report: ReportParams = ReportParams()
    flow: FlowParams = FlowParams()
    profiles: dict[ProfileName, Profile] = {"cpu": Profile(), "full": Profile(), "gpu": Profile()}

    @model_validator(mode="after")
    def _profiles_apply(self) -> Params:
        for name, profile in self.profiles.items():
            for section, overrides in profile:
                moved = [key for key in PIPELINE_PATHS.get(section, ()) if key in overrides]
                if moved:
                    raise ValueError(f"profiles.{name}.{section}.{moved[0]}: a profile cannot move a path that "
                                     "dvc.yaml declares as a stage output; set it in the base section")
                merged = _deep_merge(getattr(self, section).model_dump(), overrides)
                try:
                    type(getattr(self, section)).model_validate(merged)
                except ValidationError as error:
                    raise ValueError("; ".join(_problems(error, f"profiles.{name}.{section}."))) from None
        return self


def _deep_merge(base: dict, overrides: dict) -> dict:
    merged = dict(base)
    for key, value in overrides.items():
        merged[key] = _deep_merge(base[key], value) if isinstance(value, dict) and isinstance(
            base.get(key), dict) else value
    return merged


def resolve_profile(params: Params, name: str | None = None, cuda_available: bool | None = None) -> Params:
    """Params with the named profile (or params.profile; 'auto' picks gpu when CUDA is present) applied."""
    name = name or params.profile
    if name == "auto":
        if cuda_available is None:
            import torch

            cuda_available = torch.cuda.is_available()
        name = "gpu" if cuda_available else "cpu"
    if name not in params.profiles:
        raise ParamsError(f"unknown profile {name!r}; params.yaml defines {sorted(params.profiles)}")
    data = params.model_dump()
    for section, overrides in params.profiles[name]:
        data[section] = _deep_merge(data[section], overrides)
    data["profile"] = name
    return Params.model_validate(data)


def set_profile(path: Path, name: str) -> None:
    """Write `profile: name` into the params file at `path`, keeping every other line (and comment) as it is."""
    if name not in ("auto", *ProfileName.__args__):
        raise ParamsError(f"unknown profile {name!r}; choose auto, {', '.join(ProfileName.__args__)}")
    lines = Path(path).read_text().splitlines(keepends=True)
    for i, line in enumerate(lines):
        if re.match(r"profile:\s", line):
            lines[i] = re.sub(r"^profile:\s*[^\s#]*", f"profile: {name}", line)
            break
    else:
        lines.insert(0, f"profile: {name}\n")
    parse_params(yaml.safe_load("".join(lines)), Path(path))  # still valid before it replaces the file
    with atomic_file(path) as staged:
        staged.write_text("".join(lines))


class ParamsError(ValueError):
    """params.yaml is unreadable or holds an unknown or invalid key; the message names it."""


def _problems(error: ValidationError, prefix: str = "") -> list[str]:
    problems = []
    for item in error.errors():
        key = prefix + ".".join(str(part) for part in item["loc"])
        if item["type"] == "extra_forbidden":
            problems.append(f"unknown key '{key}'")
        elif item["type"] == "value_error" and not item["loc"]:
            problems.append(str(item["ctx"]["error"]))  # already phrased by a model validator
        else:
            problems.append(f"invalid value for '{key or '<top level>'}': {item['msg']}")
    return problems


def _describe(error: ValidationError, source: Path) -> str:
    return "\n".join(f"{source}: {problem}" for problem in _problems(error))


def parse_params(data: object, source: Path | str = "<params>") -> Params:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ParamsError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return Params.model_validate(data)
    except ValidationError as error:
        raise ParamsError(_describe(error, Path(source))) from None


def load_params(path: Path | str = DEFAULT_PARAMS) -> Params:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ParamsError(f"{path}: no such params file") from None
    except yaml.YAMLError as error:
        raise ParamsError(f"{path}: not valid YAML: {error}") from None
    return parse_params(data, path)
