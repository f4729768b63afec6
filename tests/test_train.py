"""Training, MLflow tracking, resume and the champion gate, on a tiny dataset and a thin FCN-8s."""

import json
import os
import socket

import mlflow
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from mlflow import MlflowClient

from pipeline import realdata, registry, stages, synth
from pipeline import train as train_module
from pipeline.checkpoint import model_from
from pipeline.dataset import WaferDataset, write_dataset
from pipeline.params import Params, parse_params
from pipeline.model import FCN, build_model, encode_maps
from pipeline.registry import Score
from pipeline.train import fit
from pipeline.wafer import WaferError
from tests.real_fixture import tiny_real

pytestmark = pytest.mark.slow  # trains models


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """300 synthetic wafers of a small fixed shape, and params for a fast, thin model."""
    root = tmp_path_factory.mktemp("train")
    params = parse_params({
        "seed": 7,
        "synth": {"wafers_per_lot": 10},
        "dataset": {"dir": str(root / "data")},
        "model": {"width": 0.0625, "dropout": 0.1},
        "train": {"epochs": 3, "batch_wafers": 16, "lr": 0.003, "checkpoint_dir": str(root / "ckpt"),
                  "model_out": str(root / "model.pt"), "reports_dir": str(root / "reports"), "early_stop_patience": 10},
        "registry": {"tracking_uri": f"sqlite:///{root / 'mlflow.db'}", "artifact_dir": str(root / "artifacts"),
                     "system_metrics": False},
        "real": tiny_real(root / "real"),
        "patterns": {"offset_grid": [-2.0, 2.0, 5], "calibration_rounds": 1},
    })
    wafers = synth.generate(params.synth, seed=params.seed, n=300, shape=(32, 32))
    write_dataset(wafers, params.dataset.dir, params.dataset, params.seed)
    return root, params


@pytest.fixture(scope="module")
def trained(tiny):
    """One `stages.train` on `tiny`: its MLflow run, the registry's champion and the train stage's files.
    Tests that read them ask for this fixture, so each one runs alone and in any order."""
    root, params = tiny
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        summary = stages.train(params, params.dataset.dir)
    return root, params, summary


def _with_train(params: Params, root, name: str, **train) -> Params:
    data = params.model_dump(mode="json")
    data["train"].update(checkpoint_dir=str(root / name), **train)
    return Params.model_validate(data)


def test_training_lowers_loss_and_logs_an_mlflow_run(trained, monkeypatch):
    root, params, summary = trained
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    client = MlflowClient(params.registry.tracking_uri)
    run = client.get_run(summary["run_id"])
    losses = [m.value for m in client.get_metric_history(run.info.run_id, "train_loss")]
    val_miou = client.get_metric_history(run.info.run_id, "val_miou")
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert [m.step for m in val_miou] == [1, 2, 3]
    assert run.data.params["model.width"] == "0.0625"
    assert run.data.params["dataset.version"] == summary["dataset_version"]
    assert 0.0 <= run.data.metrics["test_miou"] <= 1.0
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert artifacts == {"plots/confusion_test.png", "plots/overlays_test.png", "plots/real_scores.md",
                         *(f"plots/real_{split}_{name}.png" for split in ("val", "test") for name in ("wm811k", "mixedwm38"))}
    # every epoch is scored on real val too, and the run logs real val and test scores
    assert len(client.get_metric_history(run.info.run_id, "val_wm811k_balanced_accuracy")) == 3
    for key in ("val_wm811k_balanced_accuracy", "test_wm811k_false_alarm_rate", "test_mixedwm38_exact_match",
                "val_mixedwm38_f1_ring", "val_objective_calibrated"):
        assert 0.0 <= run.data.metrics[key] <= 1.0, key
    version = client.get_model_version_by_alias("wafer-fcn8s", "champion")
    assert str(version.version) == summary["model_version"] and summary["promoted"]
    assert [a.path for a in client.list_artifacts(run.info.run_id, "weights")] == ["weights/model.pt"]
    mlflow.set_tracking_uri(params.registry.tracking_uri)

    def unpickle(*args, **kwargs):
        raise AssertionError("a registry model was unpickled")

    monkeypatch.setattr(mlflow.pytorch, "load_model", unpickle)  # registry versions load weights only
    loaded, label = registry.load_model("models:/wafer-fcn8s@champion", params.registry, torch.device("cpu"))
    assert label == f"wafer-fcn8s/{version.version}"
    reference = torch.load(params.train.model_out, weights_only=True)["model"]
    assert all(torch.equal(weight, reference[name]) for name, weight in loaded.state_dict().items())
    # the calibrated decision travels with the weights
    names = ("ring", "scratch", "local_zone", "circle")
    offsets = [[run.data.metrics[f"{row}offset_{name}"] for name in names] for row in ("", "claim_")]
    assert loaded.pattern_offsets.tolist() == [pytest.approx(row) for row in offsets]


def test_warm_start_loads_the_champions_weights_when_the_architecture_matches(trained, monkeypatch):
    root, params, summary = trained
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    registry.configure(params.registry)
    champion, _ = registry.load_model("models:/wafer-fcn8s@champion", params.registry, torch.device("cpu"))
    warm, label = stages.warm_start(params, torch.device("cpu"))
    assert label == f"wafer-fcn8s/{registry.current_champion('wafer-fcn8s')}"
    for name, weight in champion.state_dict().items():
        assert torch.equal(weight, warm.state_dict()[name]), name
    wider = params.model_copy(update={"model": params.model.model_copy(update={"width": 0.125})})
    assert stages.warm_start(wider, torch.device("cpu")) == (None, None)


def test_without_a_champion_training_starts_from_the_init_weights(trained, tmp_path, monkeypatch):
    root, params, _ = trained
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    empty = params.registry.model_copy(update={"tracking_uri": f"sqlite:///{tmp_path / 'empty.db'}"})

    def with_init(init_weights) -> Params:
        train = params.train.model_copy(update={"init_weights": init_weights})
        return params.model_copy(update={"registry": empty, "train": train})

    registry.configure(empty)
    try:
        warm, label = stages.warm_start(with_init(params.train.model_out), torch.device("cpu"))
        assert label.startswith(f"checkpoint:{params.train.model_out.name}:")
        reference = torch.load(params.train.model_out, weights_only=True)["model"]
        assert all(torch.equal(weight, reference[name]) for name, weight in warm.state_dict().items())
        assert stages.warm_start(with_init(None), torch.device("cpu")) == (None, None)
        with pytest.raises(FileNotFoundError, match=r"no.pt: no such weights file \(train.init_weights; null starts from scratch\)"):
            stages.warm_start(with_init(tmp_path / "no.pt"), torch.device("cpu"))
    finally:
        registry.configure(params.registry)


def test_a_model_without_weights_only_checkpoint_loads_only_when_the_user_opts_in(trained, monkeypatch):
    """A `runs:/` URI has no weights-only checkpoint: loading it would unpickle MLflow's model (run its code)."""
    root, params, summary = trained
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    registry.configure(params.registry)
    run_id = MlflowClient().get_model_version_by_alias("wafer-fcn8s", "champion").run_id
    uri = f"runs:/{run_id}/model"
    with pytest.raises(ValueError, match=r"runs:/.*no single weights-only checkpoint.*registry.allow_pickled_models"):
        registry.load_model(uri, params.registry, torch.device("cpu"))
    trusting = params.registry.model_copy(update={"allow_pickled_models": True})
    model, label = registry.load_model(uri, trusting, torch.device("cpu"))
    assert label == uri and isinstance(model, FCN)


def test_resume_reproduces_the_uninterrupted_run(tiny):
    root, params = tiny
    dataset = WaferDataset(params.dataset.dir)
    straight = fit(_with_train(params, root, "straight", epochs=2), dataset)
    interrupted = _with_train(params, root, "resumed", epochs=2)

    class Crash(Exception):
        pass

    def crash_after_first_epoch(epoch, record):
        raise Crash  # after epoch 1's checkpoint is written, as a killed process would leave it

    with pytest.raises(Crash):
        fit(interrupted, dataset, on_epoch=crash_after_first_epoch)
    resumed = fit(interrupted, dataset, resume=True)
    assert resumed.state.epoch == 2
    assert [h["train_loss"] for h in resumed.state.history] == [h["train_loss"] for h in straight.state.history]
    for name, weight in straight.model.state_dict().items():
        assert torch.equal(weight, resumed.model.state_dict()[name]), name
    # the same checkpoint does not resume a run with other settings
    changed = _with_train(params, root, "resumed", epochs=2, lr=0.01)
    with pytest.raises(ValueError, match=r"last.pt: cannot resume: the checkpoint was trained with other train"):
        fit(changed, dataset, resume=True)
    assert not list((root / "resumed").glob("*.tmp")), "a staging file was left beside the checkpoint"


def test_a_warm_start_keeps_its_own_weights_unless_an_epoch_beats_them_on_val(tiny, monkeypatch):
    root, params = tiny
    dataset = WaferDataset(params.dataset.dir)
    start = build_model(params.model)
    initial = {name: weight.clone() for name, weight in start.state_dict().items()}
    scores = iter([0.9, 0.2, 0.95])  # epoch 0 (the warm start), epoch 1 (worse), epoch 2 (better)
    original = train_module.validation_record

    def scripted(*args, **kwargs):
        return {**original(*args, **kwargs), "val_score": next(scores)}

    monkeypatch.setattr(train_module, "validation_record", scripted)
    kept = fit(_with_train(params, root, "warm-kept", epochs=1), dataset, model=start)
    assert kept.state.best_epoch == 0 and kept.state.best_score == 0.9
    for name, weight in kept.model.state_dict().items():
        assert torch.equal(weight, initial[name]), name
    scores = iter([0.9, 0.95])
    beaten = fit(_with_train(params, root, "warm-beaten", epochs=1), dataset, model=build_model(params.model))
    assert beaten.state.best_epoch == 1 and beaten.state.best_score == 0.95


def _scores(miou: float, wm811k: float, mixed: float) -> dict[str, Score]:
    return {"synthetic_miou": Score(miou, 0.005), "wm811k": Score(wm811k, 0.01), "mixedwm38": Score(mixed, 0.01)}


def test_gate_refuses_a_challenger_that_loses_real_accuracy(tiny, monkeypatch):
    root, params = tiny
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    reg = params.registry.model_copy(update={"model_name": "gate-test"})
    registry.configure(reg)
    client = MlflowClient()
    client.create_registered_model("gate-test")
    measured = {}

    def new_version(scores):
        version = client.create_model_version("gate-test", source="file:///nowhere").version
        measured[f"models:/gate-test/{version}"] = scores
        return version, scores

    def gate(scores):
        return registry.gate("gate-test", *new_version(scores), measured.__getitem__, sigmas=2.0)

    first = gate(_scores(0.70, 0.80, 0.80))
    better = gate(_scores(0.72, 0.85, 0.82))
    # far better synthetic mIoU, but WM-811K balanced accuracy 0.05 lower (> 2 x 0.014): refused
    loses_real = gate(_scores(0.90, 0.80, 0.90))
    # 0.01 lower on WM-811K is within the noise, and the mean is higher: promoted
    within_noise = gate(_scores(0.73, 0.84, 0.85))
    worse_mean = gate(_scores(0.73, 0.84, 0.84))
    assert first.promoted and first.champion_version is None
    assert better.promoted and better.champion["wm811k"].value == 0.80
    assert not loses_real.promoted and loses_real.losses == ("wm811k",)
    assert within_noise.promoted and within_noise.losses == ()
    assert not worse_mean.promoted and worse_mean.losses == ()
    assert client.get_model_version_by_alias("gate-test", "champion").version == within_noise.challenger_version
    assert client.get_model_version_by_alias("gate-test", "challenger").version == worse_mean.challenger_version
    tag = client.get_model_version("gate-test", loses_real.challenger_version).tags["gate"]
    assert "stays challenger: loses wm811k beyond the noise" in tag


def test_evaluate_stage_matches_the_logged_test_metrics(trained, monkeypatch):
    root, params, summary = trained
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    written = json.loads((params.train.reports_dir / "train_summary.json").read_text())
    assert (written["run_id"], written["model_version"]) == (summary["run_id"], summary["model_version"])
    out = root / "evaluate"
    metrics = stages.evaluate(f"models:/wafer-fcn8s/{summary['model_version']}", params.dataset.dir, "test",
                                out, params)
    assert metrics["miou"] == pytest.approx(summary["test_miou"])
    written = json.loads((out / "metrics_test.json").read_text())
    assert written["model"] == f"wafer-fcn8s/{summary['model_version']}"
    assert np.array(written["confusion"]).sum() == sum(w.n_dies for w in WaferDataset(params.dataset.dir).wafers("test"))
    assert (out / "confusion_test.png").stat().st_size > 0 and (out / "overlays_test.png").stat().st_size > 0


def test_train_stage_writes_the_model_curve_and_metrics_dvc_reads(trained, monkeypatch):
    root, params, summary = trained
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    written = json.loads((params.train.reports_dir / "train_summary.json").read_text())
    assert (written["run_id"], written["model_version"]) == (summary["run_id"], summary["model_version"])
    history = pd.read_csv(params.train.reports_dir / "history.csv")
    assert list(history["epoch"]) == list(range(1, summary["epochs_run"] + 1))
    assert {"train_loss", "val_miou", "val_defect_miou", "val_score", "val_wm811k_balanced_accuracy",
            "val_mixedwm38_exact_match"} <= set(history.columns)
    metrics = json.loads((params.train.reports_dir / "metrics.json").read_text())
    assert metrics["test"]["miou"] == pytest.approx(summary["test_miou"], abs=1e-6)
    assert set(metrics["test"]["iou"]) == {"background", "ring", "scratch", "local_zone", "circle"}
    assert set(metrics["real"]) == {"val", "test"} and set(metrics["real"]["test"]) == {"wm811k", "mixedwm38"}
    assert metrics["real"]["test"]["wm811k"]["balanced_accuracy"] == pytest.approx(
        summary["test_wm811k_balanced_accuracy"], abs=1e-4)
    # the saved model is the selected one: it scores exactly what the run logged
    evaluated = stages.evaluate(str(params.train.model_out), params.dataset.dir, "test", root / "ev", params)
    assert evaluated["miou"] == pytest.approx(summary["test_miou"])


def _ddp_rank(rank: int, world_size: int, port: int, params_json: str, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    params = Params.model_validate_json(params_json)
    result = fit(params, WaferDataset(params.dataset.dir))
    torch.save({"weights": result.model.state_dict(), "history": result.state.history}, f"{out}/rank{rank}.pt")


def test_ddp_on_cpu_with_gloo_keeps_both_ranks_in_step(tiny, tmp_path):
    """The torchrun code path, on CPU: 2 processes, gloo; each trains on half of the batches."""
    root, params = tiny
    params = _with_train(params, root, "ddp", epochs=1)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    torch.multiprocessing.spawn(_ddp_rank, args=(2, port, params.model_dump_json(), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for name, weight in ranks[0]["weights"].items():
        torch.testing.assert_close(weight, ranks[1]["weights"][name], rtol=0, atol=0, msg=name)
    assert (root / "ddp" / "last.pt").is_file()  # rank 0 wrote the checkpoint
    alone = fit(params, WaferDataset(params.dataset.dir))  # all batches in one process: another result
    assert any(not torch.equal(alone.model.state_dict()[n], w) for n, w in ranks[0]["weights"].items())


def test_evaluate_real_stage_gives_the_scores_the_run_logged(trained, monkeypatch):
    root, params, summary = trained
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = root / "real-eval"
    tables = stages.evaluate_real(str(params.train.model_out), params, "test", out)
    written = json.loads((out / "metrics.json").read_text())["test"]
    assert written["wm811k"]["balanced_accuracy"] == pytest.approx(summary["test_wm811k_balanced_accuracy"], abs=1e-4)
    assert written["mixedwm38"]["exact_match"] == pytest.approx(summary["test_mixedwm38_exact_match"], abs=1e-4)
    assert "balanced accuracy" in tables.lower() and (out / "real_test_wm811k.png").stat().st_size > 0
    # a labelled source named on the command line is scored on all its wafers
    source = stages.evaluate_real(str(params.train.model_out), params, "test", root / "src",
                              [params.real.sets["wm811k"].path])
    assert json.loads((root / "src" / "metrics.json").read_text())["source"]["wm811k"]["wafers"] == 80
    assert source
    unlabelled = root / "unlabelled.parquet"
    pq.write_table(pq.read_table(params.real.sets["wm811k"].path).drop_columns(["failure_type"]), unlabelled)
    with pytest.raises(WaferError, match="unlabelled.parquet: wafer .*: no wafer-level label"):
        stages.evaluate_real(str(params.train.model_out), params, "test", root / "none", [unlabelled])


def test_a_checkpoint_from_before_batch_norm_and_the_decision_still_loads(tmp_path):
    """Registries hold versions trained before `model.batch_norm`, `global_context` and the calibrated offsets."""
    torch.manual_seed(0)
    old = FCN("fcn8s", 0.0625, 0.5)  # the architecture those versions had
    weights = {k: v for k, v in old.state_dict().items() if k != "pattern_offsets"}
    model_keys = {"arch": "fcn8s", "width": 0.0625, "dropout": 0.5}
    checkpoint = {"model": weights, "state": {}, "params": {"model": model_keys}}
    loaded = model_from(checkpoint, torch.device("cpu"))
    assert loaded.score_global is None and loaded.pattern_offsets.tolist() == [[0.0] * 4] * 2
    maps = torch.randint(0, 3, (2, 40, 40))
    old.eval()
    torch.testing.assert_close(loaded(encode_maps(maps)), old(encode_maps(maps)))


def test_a_checkpoint_from_before_claim_offsets_decides_as_it_did():
    """Versions calibrated before claim offsets carry four offsets, which decided presence and claims alike."""
    torch.manual_seed(0)
    model = FCN("fcn8s", 0.0625, 0.1, batch_norm=True, global_context=True)
    weights = dict(model.state_dict())
    weights["pattern_offsets"] = torch.tensor([0.5, 1.5, 1.0, -0.5])
    model_keys = {"arch": "fcn8s", "width": 0.0625, "dropout": 0.1, "batch_norm": True, "global_context": True}
    loaded = model_from({"model": weights, "state": {}, "params": {"model": model_keys}}, torch.device("cpu"))
    assert loaded.pattern_offsets.tolist() == [[0.5, 1.5, 1.0, -0.5]] * 2


def test_a_relative_sqlite_store_is_the_one_of_the_directory_it_is_used_from(tmp_path, monkeypatch):
    """MLflow keeps one store per URI string: `sqlite:///mlflow.db` must not reach the first workspace's DB
    when a later run in the same process works in another workspace."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    relative = parse_params({}).registry
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        monkeypatch.chdir(tmp_path / name)
        assert registry.tracking_uri(relative) == f"sqlite:///{tmp_path / name / 'mlflow.db'}"
    absolute = parse_params({"registry": {"tracking_uri": f"sqlite:///{tmp_path / 'x.db'}",
                                          "artifact_dir": str(tmp_path / "artifacts")}}).registry
    assert registry.tracking_uri(absolute) == f"sqlite:///{tmp_path / 'x.db'}"
    server = parse_params({"registry": {"tracking_uri": "http://127.0.0.1:5000"}}).registry
    assert registry.tracking_uri(server) == "http://127.0.0.1:5000"
    registry.configure(absolute)  # MLflow itself would leave it in the environment for the next workspace
    assert "MLFLOW_TRACKING_URI" not in os.environ


def test_offsets_given_in_params_are_used_as_they_are_and_scored_not_calibrated(tiny, monkeypatch):
    root, params = tiny
    real = realdata.load_real_sets(params.real)
    model = build_model(params.model).eval()

    def no_calibration(*args, **kwargs):
        raise AssertionError("calibrated although params give the offsets")

    monkeypatch.setattr(train_module, "calibrate_offsets", no_calibration)
    given = params.model_copy(update={"patterns": params.patterns.model_copy(
        update={"offsets": (0.0, 0.0, 0.0, 0.0), "claim_offsets": (0.5, -1.0, 1.5, 2.0)})})
    result = train_module.calibrate(model, {n: s["val"] for n, s in real.items()}, given, torch.device("cpu"), False)
    assert model.pattern_offsets.tolist() == [[0.0] * 4, [0.5, -1.0, 1.5, 2.0]]
    assert result["claim_offset_circle"] == 2.0 and result["offset_ring"] == 0.0
    zeros = params.model_copy(update={"patterns": params.patterns.model_copy(update={"offsets": (0.0,) * 4})})
    result = train_module.calibrate(model, {n: s["val"] for n, s in real.items()}, zeros, torch.device("cpu"), False)
    assert result["val_objective_calibrated"] == result["val_objective_uncalibrated"]  # the objective at 0
