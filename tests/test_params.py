from pathlib import Path

import pytest
import yaml

from pipeline.params import Params, ParamsError, load_params, parse_params

REPO = Path(__file__).resolve().parents[1]


def test_repo_params_load_and_set_every_key():
    params = load_params(REPO / "params.yaml")
    written = yaml.safe_load((REPO / "params.yaml").read_text())

    def keys(tree, prefix=""):
        for key, value in tree.items():
            path = f"{prefix}{key}"
            if isinstance(value, dict) and not path.endswith("kind_weights"):
                yield from keys(value, path + ".")
            else:
                yield path

    # params.yaml is the single source: no setting may silently fall back to a code default.
    assert set(keys(written)) == set(keys(params.model_dump(mode="json")))


def test_the_code_defaults_are_the_shipped_params_yaml():
    """One set of defaults: a key a params file leaves out means what the shipped params.yaml says, so the
    pydantic defaults (what tests and partial files get) and params.yaml cannot drift apart."""
    written = yaml.safe_load((REPO / "params.yaml").read_text())
    shipped = parse_params(written).model_dump(mode="json", exclude={"profiles"})
    assert parse_params({}).model_dump(mode="json", exclude={"profiles"}) == shipped


def test_unknown_key_is_named(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("synth:\n  n_wafer: 10\n")
    with pytest.raises(ParamsError, match=r"params.yaml: unknown key 'synth.n_wafer'"):
        load_params(path)


def test_invalid_value_is_named():
    with pytest.raises(ParamsError, match=r"invalid value for 'dataset.split'.*must be 1"):
        parse_params({"dataset": {"split": {"train": 0.5, "val": 0.1, "test": 0.1}}}, "p.yaml")
    with pytest.raises(ParamsError, match=r"invalid value for 'synth.n_wafers'"):
        parse_params({"synth": {"n_wafers": -3}}, "p.yaml")


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ParamsError, match="no such params file"):
        load_params(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("synth: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ParamsError, match="expected a mapping"):
        load_params(bad)


def test_params_are_frozen():
    with pytest.raises(Exception):
        Params().seed = 3  # type: ignore[misc]


def test_cli_reports_a_bad_key_and_exits_2(tmp_path):
    from typer.testing import CliRunner

    from pipeline.cli import app

    (tmp_path / "params.yaml").write_text("train:\n  epoch: 3\n")
    result = CliRunner().invoke(app, ["generate", "--params", str(tmp_path / "params.yaml")])
    assert result.exit_code == 2
    assert "unknown key 'train.epoch'" in " ".join(result.output.split())


def test_a_profile_may_not_move_a_path_dvc_declares():
    with pytest.raises(ParamsError, match=r"profiles.gpu.train.model_out: a profile cannot move a path that dvc.yaml"):
        parse_params({"profiles": {"gpu": {"train": {"model_out": "models/other.pt"}}}}, "p.yaml")
    assert parse_params({"profiles": {"gpu": {"train": {"checkpoint_dir": "checkpoints/gpu"}}}}, "p.yaml")


def test_set_profile_changes_only_the_profile_line(tmp_path):
    from pipeline.params import set_profile

    path = tmp_path / "params.yaml"
    original = (REPO / "params.yaml").read_text()
    path.write_text(original)
    set_profile(path, "full")
    assert load_params(path).profile == "full"
    changed = [(a, b) for a, b in zip(original.splitlines(), path.read_text().splitlines()) if a != b]
    assert len(changed) == 1 and changed[0][1].startswith("profile: full ") and "#" in changed[0][1]
    with pytest.raises(ParamsError, match="unknown profile 'huge'"):
        set_profile(path, "huge")
    assert load_params(path).profile == "full"
