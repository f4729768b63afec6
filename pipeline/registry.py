"""MLflow: where runs are tracked, how a model is logged and registered, the champion gate, and loading
a model back by registry URI or from a local checkpoint."""

from __future__ import annotations

import hashlib
import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature

from pipeline.model import build_model, encode_maps
from pipeline.params import ModelParams, RegistryParams

log = logging.getLogger(__name__)

CHALLENGER, CHAMPION = "challenger", "champion"
# The model runs in the pipeline's own environment; naming them skips MLflow's slow requirement inference.
PIP_REQUIREMENTS = ["torch==2.14.1", "torchvision==0.29.1", "waferseg"]


def tracking_uri(params: RegistryParams) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or params.tracking_uri


def configure(params: RegistryParams) -> str:
    """Point MLflow at the tracking store, create it and the experiment once; return the experiment id."""
    mlflow.set_tracking_uri(tracking_uri(params))
    client = MlflowClient()
    experiment = client.get_experiment_by_name(params.experiment)
    if experiment is not None:
        mlflow.set_experiment(experiment_id=experiment.experiment_id)
        return experiment.experiment_id
    artifacts = params.artifact_dir.resolve()
    artifacts.mkdir(parents=True, exist_ok=True)
    experiment_id = client.create_experiment(params.experiment, artifact_location=artifacts.as_uri())
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def log_model(model: torch.nn.Module, example_maps: np.ndarray, registered_name: str):
    """Log the model with a signature over encoded maps (N, 3, H, W) and register it; return ModelInfo."""
    model = model.cpu().eval()
    example = encode_maps(torch.from_numpy(example_maps)).numpy()
    with torch.no_grad():
        output = model(torch.from_numpy(example)).numpy()
    # "pickle", not MLflow 3's default "pt2": torch.export would specialise the example's map size, and
    # the model must take any size (it pads to a multiple of 32 and crops back).
    return mlflow.pytorch.log_model(model, name="model", signature=infer_signature(example, output),
                                    input_example=example, pip_requirements=PIP_REQUIREMENTS,
                                    serialization_format="pickle", registered_model_name=registered_name)


@dataclass(frozen=True)
class GateDecision:
    promoted: bool
    challenger_version: str
    challenger_miou: float
    champion_version: str | None
    champion_miou: float | None

    def describe(self) -> str:
        if self.champion_version is None:
            return f"version {self.challenger_version} is champion: there was none (test mIoU {self.challenger_miou:.4f})"
        verdict = "promoted to champion" if self.promoted else "stays challenger"
        return (f"version {self.challenger_version} {verdict}: test mIoU {self.challenger_miou:.4f} vs champion "
                f"version {self.champion_version} {self.champion_miou:.4f} on the same test split")


def current_champion(name: str) -> str | None:
    try:
        return str(MlflowClient().get_model_version_by_alias(name, CHAMPION).version)
    except MlflowException:
        return None


def champion_dataset(name: str) -> str | None:
    """The content hash of the dataset the current champion was trained on (None: no champion)."""
    version = current_champion(name)
    if version is None:
        return None
    client = MlflowClient()
    run_id = client.get_model_version(name, version).run_id
    return client.get_run(run_id).data.params.get("dataset.content_hash")


def gate(name: str, version: str, challenger_miou: float, champion_miou_on_this_split) -> GateDecision:
    """Alias the new version `challenger`; make it `champion` only if it beats the current champion,
    whose mIoU `champion_miou_on_this_split(uri)` measures on the challenger's own test split."""
    client = MlflowClient()
    client.set_registered_model_alias(name, CHALLENGER, version)
    champion = current_champion(name)
    champion_miou = None if champion is None else float(champion_miou_on_this_split(f"models:/{name}/{champion}"))
    promoted = champion is None or challenger_miou > champion_miou
    if promoted:
        client.set_registered_model_alias(name, CHAMPION, version)
    decision = GateDecision(promoted, version, challenger_miou, champion, champion_miou)
    client.set_model_version_tag(name, version, "gate", decision.describe())
    log.info("gate: %s", decision.describe())
    return decision


def load_model(uri: str, params: RegistryParams, device: torch.device) -> tuple[torch.nn.Module, str]:
    """A model from `models:/...` (or any MLflow URI) or a local training checkpoint, with a version label
    that names exactly which weights produced a report."""
    path = Path(uri)
    if path.is_file():
        data = path.read_bytes()  # read once: hashed for the version label, then loaded
        checkpoint = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
        model = build_model(ModelParams(**checkpoint["params"]["model"]))
        state = checkpoint["state"].get("best_weights") or checkpoint["model"]
        model.load_state_dict(state)
        digest = hashlib.sha256(data).hexdigest()[:12]
        return model.to(device).eval(), f"checkpoint:{path.name}:{digest}"
    mlflow.set_tracking_uri(tracking_uri(params))
    model = mlflow.pytorch.load_model(uri, map_location=device)
    return model.to(device).eval(), resolve_version(uri)


def resolve_version(uri: str) -> str:
    """'models:/name@alias' or 'models:/name/3' -> 'name/3'; other URIs are their own label."""
    if not uri.startswith("models:/"):
        return uri
    ref = uri.removeprefix("models:/")
    client = MlflowClient()
    if "@" in ref:
        name, alias = ref.split("@", 1)
        return f"{name}/{client.get_model_version_by_alias(name, alias).version}"
    return ref
