"""A workspace for the nightly flow: git + DVC with a local remote, the project's dvc.yaml and the code its
stages depend on, the project's params.yaml shrunk to a tiny profile, a few real-format lots to seed the inbox."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import yaml

from pipeline import io, synth
from pipeline.params import parse_params
from tests.dvc_repo import run
from tests.real_fixture import tiny_real

PROJECT = Path(__file__).resolve().parents[1]
SEED_LOTS = ("REAL11-00000", "REAL11-00001", "REAL11-00002")  # the lots seed.parquet puts in the inbox


def synthetic_wafers(seed: int, n: int, prefix: str, per_lot: int = 3):
    params = parse_params({"synth": {"wafers_per_lot": per_lot, "lot_prefix": prefix}})
    return list(synth.generate(params.synth, seed=seed, n=n))


def tiny_project(root: Path) -> dict:
    """The project's dvc.yaml, the code and weights its stages depend on and its .gitignore, copied into `root`;
    returns the project's params.yaml shrunk to a tiny profile (real sets under root/real_data), not yet written."""
    root.mkdir(parents=True, exist_ok=True)
    (root / ".gitignore").write_text((PROJECT / ".gitignore").read_text())
    shutil.copy(PROJECT / "dvc.yaml", root)
    shutil.copytree(PROJECT / "pipeline", root / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(PROJECT / "pretrained", root / "pretrained")  # a train dep (train.init_weights)
    params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    params["synth"].update(n_wafers=60, wafers_per_lot=5)
    params["model"]["width"] = 0.0625
    params["train"].update(epochs=1, batch_wafers=16, device="cpu")
    params["registry"]["system_metrics"] = False
    params["real"] = tiny_real(root / "real_data", wafers=40, relative_to=root)
    params["patterns"].update(offset_grid=[-2.0, 2.0, 5], calibration_rounds=1)
    return params


def nightly_workspace(root: Path) -> Path:
    params = tiny_project(root)
    run(root, "git", "init", "-q")
    run(root, sys.executable, "-m", "dvc", "init", "-q")
    run(root, sys.executable, "-m", "dvc", "remote", "add", "-d", "local", str(root / "dvc-remote"))
    params["flow"].update(seed_lots=str(root / "seed.parquet"), retry_delay_s=0)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    io.write_die_table(synthetic_wafers(11, n=9, prefix="REAL"), root / "seed.parquet")
    return root
