"""The run folder never overwrites the user's inputs and a config name never leads out of runs/."""

import json

import pytest

from tunebench.cli import main
from tunebench.config import load_config
from tunebench.errors import ConfigError
from tunebench.runs import RunDir


@pytest.fixture()
def project(tmp_path, monkeypatch):
    """A user's project folder holding its training data at data/train.jsonl."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    record = json.dumps({"instruction": "挨拶して", "input": "", "output": "こんにちは"}, ensure_ascii=False) + "\n"
    (tmp_path / "data" / "train.jsonl").write_text(record, encoding="utf-8")
    (tmp_path / "c.yaml").write_text("data:\n  sources: [{path: data/train.jsonl}]\n", encoding="utf-8")
    return tmp_path


def prepare_args(tiny_model_dir, *extra):
    return ["data", "prepare", "c.yaml", "--set", f"model.name_or_path={tiny_model_dir}",
            "--set", "data.contamination_sets=[]", *extra]


@pytest.mark.parametrize("where", [["--run-dir", "."], ["--run-dir", "data/.."], ["--set", "name=.."]])
def test_a_run_folder_holding_the_training_data_is_refused(project, tiny_model_dir, capsys, where):
    before = (project / "data" / "train.jsonl").read_bytes()
    assert main(prepare_args(tiny_model_dir, *where)) == 2
    err = capsys.readouterr().err
    assert "error:" in err and ("inside the run folder" in err or "inside runs/" in err)
    assert (project / "data" / "train.jsonl").read_bytes() == before  # never overwritten with token ids


@pytest.mark.parametrize("name", ["..", "../elsewhere", "ABSOLUTE", "."])
def test_run_names_stay_inside_runs(project, name):
    name = str(project / "elsewhere") if name == "ABSOLUTE" else name
    with pytest.raises(ConfigError, match="inside runs/"):
        RunDir.for_config(load_config(None, [f"name={name}"]))
    assert not (project / "elsewhere").exists()


def test_ordinary_names_and_explicit_run_dirs_still_work(project, tmp_path):
    assert RunDir.for_config(load_config(None, ["name=exp/a"])).root.resolve() == project / "runs" / "exp" / "a"
    other = tmp_path / "outside"
    assert RunDir.for_config(load_config(None, ["name=.."]), str(other)).root == other
