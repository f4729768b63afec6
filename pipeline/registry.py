"""MLflow: where runs are tracked, how a model is logged and registered, the champion gate, and loading
a model back by registry URI or from a local checkpoint."""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ParamSpec, TypeVar

import mlflow
import numpy as np
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature

from pipeline import checkpoint
from pipeline.model import encode_maps
from pipeline.params import RegistryParams

P = ParamSpec("P")
R = TypeVar("R")

log = logging.getLogger(__name__)

CHALLENGER, CHAMPION = "challenger", "champion"
WEIGHTS_DIR = "weights"  # run artifact folder of the weights-only checkpoint
NOT_FOUND = {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"}  # error codes of a missing model or alias
# The model runs in the pipeline's own environment; naming them skips MLflow's slow requirement inference.
PIP_REQUIREMENTS = ["torch==2.14.1", "torchvision==0.29.1", "waferseg"]


class RegistryError(RuntimeError):
    """The tracking store could not be used; the message says which store and why."""


_lock_policy = RegistryParams()  # set by configure(): how long to retry a tracking DB locked by another writer


def _is_locked(error: BaseException) -> bool:
    if isinstance(error, RegistryError):  # an inner call has retried already
        return False
    while error is not None:
        if "database is locked" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def retry_when_locked(function: Callable[P, R]) -> Callable[P, R]:
    """Retry `function` with doubling waits while the tracking DB is locked by another writer; then a clear error."""

    @functools.wraps(function)
    def retrying(*args: P.args, **kwargs: P.kwargs) -> R:
        policy = _lock_policy
        delay = policy.lock_backoff_s
        for attempt in range(policy.lock_retries + 1):
            try:
                return function(*args, **kwargs)
            except Exception as error:
                if not _is_locked(error):
                    raise
                if attempt == policy.lock_retries:
                    raise RegistryError(
                        f"{mlflow.get_tracking_uri()}: the MLflow database stayed locked by another writer through "
                        f"{attempt + 1} tries of {function.__name__} (registry.lock_retries, lock_backoff_s); "
                        "let that process finish or move to a server-backed store, then run again") from error
                log.warning("%s: MLflow database locked by another writer; retry %d/%d in %.1f s",
                            function.__name__, attempt + 1, policy.lock_retries, delay)
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    return retrying


SQLITE_URI = "sqlite:///"
TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"  # the user's override of registry.tracking_uri


def tracking_uri(params: RegistryParams) -> str:
    """The tracking store; a relative SQLite path is resolved against the current directory now: MLflow keeps one
    store per URI string, so the same relative URI used later from another workspace would reach this one's DB."""
    uri = os.environ.get(TRACKING_URI_ENV) or params.tracking_uri
    if uri.startswith(SQLITE_URI) and not uri.startswith(SQLITE_URI + "/"):
        return SQLITE_URI + str(Path(uri.removeprefix(SQLITE_URI)).resolve())
    return uri


def _set_tracking_uri(uri: str) -> None:
    """mlflow.set_tracking_uri also writes MLFLOW_TRACKING_URI into the environment, where it would override
    params.yaml for every later workspace of this process and of its children: the environment is put back."""
    before = os.environ.get(TRACKING_URI_ENV)
    mlflow.set_tracking_uri(uri)
    if before is None:
        os.environ.pop(TRACKING_URI_ENV, None)
    else:
        os.environ[TRACKING_URI_ENV] = before


def configure(params: RegistryParams) -> str:
    """Point MLflow at the tracking store, create it and the experiment once; return the experiment id."""
    global _lock_policy
    _lock_policy = params
    return _configure(params)


@retry_when_locked
def _configure(params: RegistryParams) -> str:
    _set_tracking_uri(tracking_uri(params))
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


# The tracking calls of a training run, retried while another writer holds the SQLite DB. Each is safe to
# repeat: params and tags are written again with the same values, metrics are appended, artifacts replaced.
start_run = retry_when_locked(mlflow.start_run)
log_params = retry_when_locked(mlflow.log_params)
log_metrics = retry_when_locked(mlflow.log_metrics)
set_tags = retry_when_locked(mlflow.set_tags)
log_artifact = retry_when_locked(mlflow.log_artifact)
log_dict = retry_when_locked(mlflow.log_dict)


def log_and_register_model(model: torch.nn.Module, example_maps: np.ndarray, registered_name: str) -> str:
    """Log the model to the active run, then register it once; the registered version. A retry after a
    locked database never registers the run's model twice: an existing version of this run is reused."""
    info = log_model(model, example_maps)
    return register_run_model(info.model_uri, mlflow.active_run().info.run_id, registered_name)


@retry_when_locked
def register_run_model(model_uri: str, run_id: str, registered_name: str) -> str:
    existing = MlflowClient().search_model_versions(f"name='{registered_name}' and run_id='{run_id}'")
    if existing:
        return str(max(int(v.version) for v in existing))
    return str(mlflow.register_model(model_uri, registered_name).version)


@retry_when_locked
def log_model(model: torch.nn.Module, example_maps: np.ndarray):
    """Log the model with a signature over encoded maps (N, 3, H, W) to the active run; return ModelInfo."""
    model = model.cpu().eval()
    example = encode_maps(torch.from_numpy(example_maps)).numpy()
    with torch.no_grad():
        output = model(torch.from_numpy(example)).numpy()
    # "pickle", not MLflow 3's default "pt2": torch.export would specialise the example's map size, and
    # the model must take any size (it pads to a multiple of 32 and crops back).
    return mlflow.pytorch.log_model(model, name="model", signature=infer_signature(example, output),
                                    input_example=example, pip_requirements=PIP_REQUIREMENTS,
                                    serialization_format="pickle")


@dataclass(frozen=True)
class Score:
    """One number the gate compares (higher is better) and its noise: the standard error of the estimate."""

    value: float
    noise: float = 0.0


@dataclass(frozen=True)
class GateDecision:
    promoted: bool
    challenger_version: str
    challenger: dict[str, Score]
    champion_version: str | None
    champion: dict[str, Score] | None
    losses: tuple[str, ...] = ()

    def describe(self) -> str:
        mine = ", ".join(f"{k} {v.value:.4f}" for k, v in self.challenger.items())
        if self.champion_version is None:
            return f"version {self.challenger_version} is champion: there was none ({mine})"
        theirs = ", ".join(f"{k} {v.value:.4f}" for k, v in (self.champion or {}).items())
        if self.promoted:
            verdict = "promoted to champion"
        elif self.losses:
            verdict = f"stays challenger: loses {', '.join(self.losses)} beyond the noise"
        else:
            verdict = "stays challenger: not better on the mean of its scores"
        return f"version {self.challenger_version} {verdict}: {mine} vs champion version {self.champion_version} {theirs}"


def compare(challenger: dict[str, Score], champion: dict[str, Score], sigmas: float) -> tuple[bool, tuple[str, ...]]:
    """(promote, scores lost): a challenger loses a score when it is below the champion's by more than
    `sigmas` standard errors of the difference; it is promoted when it loses none and its mean is higher."""
    losses = tuple(name for name, mine in challenger.items()
                   if mine.value < champion[name].value - sigmas * math.hypot(mine.noise, champion[name].noise))
    better = np.mean([s.value for s in challenger.values()]) > np.mean([champion[k].value for k in challenger])
    return (not losses and bool(better)), losses


@retry_when_locked
def current_champion(name: str) -> str | None:
    return _champion_version(name)


def _champion_version(name: str) -> str | None:
    try:
        return str(MlflowClient().get_model_version_by_alias(name, CHAMPION).version)
    except MlflowException as error:
        if error.error_code in NOT_FOUND:  # no such model, or no champion alias yet
            return None
        raise


@retry_when_locked
def gate(name: str, version: str, challenger: dict[str, Score],
         champion_scores_on_this_split: Callable[[str], dict[str, Score]], sigmas: float = 2.0) -> GateDecision:
    """Alias the new version `challenger`; make it `champion` only if it loses none of its scores (synthetic
    mIoU, each real set's score on val) beyond the noise and is better on their mean. The current champion's
    scores are measured by `champion_scores_on_this_split(uri)` on the challenger's own val data."""
    client = MlflowClient()
    client.set_registered_model_alias(name, CHALLENGER, version)
    champion = _champion_version(name)
    theirs, promoted, losses = None, True, ()
    if champion is not None:
        theirs = champion_scores_on_this_split(f"models:/{name}/{champion}")
        promoted, losses = compare(challenger, theirs, sigmas)
    if promoted:
        client.set_registered_model_alias(name, CHAMPION, version)
    decision = GateDecision(promoted, version, challenger, champion, theirs, losses)
    client.set_model_version_tag(name, version, "gate", decision.describe())
    log.info("gate: %s", decision.describe())
    return decision


@retry_when_locked
def load_model(uri: str, params: RegistryParams, device: torch.device) -> tuple[torch.nn.Module, str]:
    """A model from `models:/...` (or any MLflow URI) or a local training checkpoint, with a version label
    that names exactly which weights produced a report. Registry versions load from their run's weights-only
    checkpoint (`log_weights`); anything else would unpickle MLflow's model, which runs code from the
    registry: refused unless registry.allow_pickled_models."""
    path = Path(uri)
    if path.is_file():
        data = path.read_bytes()  # read once: hashed for the version label, then loaded
        return checkpoint.model_from(checkpoint.read(io.BytesIO(data), path), device), \
            f"checkpoint:{path.name}:{hashlib.sha256(data).hexdigest()[:12]}"
    _set_tracking_uri(tracking_uri(params))
    label = resolve_version(uri)
    if uri.startswith("models:/"):
        name, version = label.rsplit("/", 1)
        run_id = MlflowClient().get_model_version(name, version).run_id
        weights = _weights_artifact(run_id)
        if weights is not None:
            with tempfile.TemporaryDirectory() as tmp:
                local = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=weights, dst_path=tmp))
                return checkpoint.model_from(checkpoint.read(local, f"{uri} ({weights})"), device), label
    if not params.allow_pickled_models:
        raise ValueError(f"{uri}: no single weights-only checkpoint under {WEIGHTS_DIR}/ to load; MLflow's pickled "
                         "model would run code from the registry. Set registry.allow_pickled_models: true in "
                         "params.yaml if you trust its source, or give a models:/ version waferseg logged")
    log.warning("%s: loading MLflow's pickled model (registry.allow_pickled_models is on)", uri)
    model = mlflow.pytorch.load_model(uri, map_location=device)
    return model.to(device).eval(), label


def log_weights(checkpoint: Path) -> None:
    """Log a weights-only checkpoint (checkpoint.save_model's file) to the active run, for load_model."""
    mlflow.log_artifact(str(checkpoint), WEIGHTS_DIR)


def _weights_artifact(run_id: str) -> str | None:
    files = [a.path for a in MlflowClient().list_artifacts(run_id, WEIGHTS_DIR) if a.path.endswith(".pt")]
    return files[0] if len(files) == 1 else None


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
