"""Ranges and combinations: a config is checked whole before any work, every problem one line naming the key."""

import dataclasses
import typing
from pathlib import Path

import pytest

from tunebench.cli import main
from tunebench.config import Config, describe, describe_keys, load_config
from tunebench.config_checks import check_config, in_range
from tunebench.errors import ConfigError

# Each value below was accepted, crashed late or hung before ranges were checked (issue 12).
OUT_OF_RANGE = ["train.save_steps=0", "train.logging_steps=0", "train.per_device_train_batch_size=0",
                "train.per_device_train_batch_size=-2", "train.lora_r=0", "train.lora_dropout=1.5",
                "train.learning_rate=0", "train.max_steps=-1", "train.max_steps=0",
                "train.gradient_accumulation_steps=0", "train.warmup_steps=-3", "train.step_tokens=0",
                "data.max_seq_length=8", "data.eval_fraction=1", "generate.top_p=0", "generate.max_new_tokens=0",
                "generate.temperature=-1", "judge.concurrency=0", "judge.samples=0"]


@pytest.mark.parametrize("override", OUT_OF_RANGE)
def test_out_of_range_value_is_one_line_naming_the_key(override):
    key, value = override.split("=")
    with pytest.raises(ConfigError) as caught:
        load_config("configs/quickstart.yaml", [override])
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"configs/quickstart.yaml: '{key}' must be ")
    assert message.endswith(f"got {float(value) if key.endswith(('rate', 'dropout', 'fraction', 'top_p', 'temperature')) else int(value)!r}")


def test_source_weight_range_names_the_list_item(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  sources:\n    - {path: a.jsonl}\n    - {path: b.jsonl, weight: -1}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"'data\.sources\[1\]\.weight' must be ≥ 0, got -1\.0"):
        load_config(path)


def test_every_numeric_key_states_its_range():
    for cls in (c for c in vars(__import__("tunebench.config", fromlist=["x"])).values()
                if dataclasses.is_dataclass(c) and c.__name__.endswith("Config")):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            numeric = {int, float} & set(typing.get_args(hints[f.name]) or (hints[f.name],))
            assert not numeric or f.metadata.get("range"), f"{cls.__name__}.{f.name} has no range"
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help text"


def test_range_notation():
    assert in_range(1, "≥ 1") and not in_range(0, "≥ 1") and in_range(1e-9, "> 0") and not in_range(0, "> 0")
    assert in_range(0, "[0, 1)") and not in_range(1, "[0, 1)") and in_range(1, "(0, 1]") and not in_range(0, "(0, 1]")
    assert in_range(2, "[0, 2]") and not in_range(2.01, "[0, 2]")


def test_every_problem_of_a_config_is_reported_at_once(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  save_steps: 0\n  lora_r: sixteen\n  learning_rat: 1e-4\n  method: prefix\n"
                    "data:\n  packing: true\n  eval_fraction: 1.5\n", encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    lines = str(caught.value).splitlines()
    assert len(lines) == 5 and all(line.startswith(f"{path}: ") for line in lines)
    for expected in ("'train.lora_r' expects an integer", "unknown key 'train.learning_rat'",
                     "'train.save_steps' must be ≥ 1", "'data.eval_fraction' must be in [0, 1)",
                     "'data.packing' cannot be combined with prefix or prompt tuning"):
        assert sum(expected in line for line in lines) == 1, expected
    assert main(["config", "show", str(path)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 5 and all(line.startswith(f"error: {path}: ") for line in err)


def test_combinations_refused_for_the_process_count():
    config = load_config(None, ["train.method=lora", "train.offload_frozen=true"])
    check_config(config, 1)
    with pytest.raises(ConfigError, match=r"'train\.offload_frozen': it works with train.method qlora or lora.*one process"):
        check_config(config, 2)
    check_config(load_config(None, ["train.method=lora", "train.answer_only_logits=true"]), 2)  # DDP runs it too
    with pytest.raises(ConfigError, match=r"'generate\.temperature' must be > 0 with generate\.do_sample"):
        load_config(None, ["generate.do_sample=true", "generate.temperature=0"])


def test_train_command_refuses_a_bad_range_before_any_work(tmp_path, capsys):
    """save_steps=0 crashed with ZeroDivisionError after 70 s of work; now one line and exit 2 at once."""
    run = tmp_path / "run"
    code = main(["train", "configs/quickstart.yaml", "--run-dir", str(run), "--set", "train.save_steps=0",
                 "--set", "train.per_device_train_batch_size=-2"])
    err = capsys.readouterr().err.splitlines()
    assert code == 2 and err == [
        "error: configs/quickstart.yaml: 'train.per_device_train_batch_size' must be ≥ 1, got -2",
        "error: configs/quickstart.yaml: 'train.save_steps' must be ≥ 1, got 0"]
    assert not (run / "data").exists()


def test_judge_flags_are_checked_too(tmp_path, capsys):
    predictions = tmp_path / "predictions.jsonl"
    predictions.write_text('{"task_id": 0, "input": "q", "output": "a"}\n', encoding="utf-8")
    code = main(["judge", str(predictions), "--judge", "openai:x", "--concurrency", "0"])
    assert code == 2 and "'judge.concurrency' must be ≥ 1, got 0" in capsys.readouterr().err


def test_readme_config_table_is_generated_from_the_fields():
    from tunebench.commands.config_cmd import markdown_table

    readme = Path("README.md").read_text(encoding="utf-8")
    block = readme.split("<!-- config-table: begin -->\n", 1)[1].split("<!-- config-table: end -->", 1)[0]
    assert block == markdown_table(describe_keys()), "regenerate the README table from config.py's fields"
    assert "<class" not in block and describe(list[Config]) == "a list of mappings (their keys follow)"


def test_config_keys_lists_every_key_with_its_meaning(capsys):
    assert main(["config", "keys"]) == 0
    out = capsys.readouterr().out
    for doc in describe_keys():
        assert f"{doc.key}  (" in out and doc.help in out
    assert main(["config", "keys", "train.save_steps"]) == 0
    assert capsys.readouterr().out == "train.save_steps  (an integer, ≥ 1; default 100)\n    optimizer steps per checkpoint\n"


def test_config_show_prints_the_resolved_config(capsys):
    assert main(["config", "show", "configs/quickstart.yaml", "--set", "train.save_steps=7"]) == 0
    import yaml

    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["train"]["save_steps"] == 7 and shown["judge"]["concurrency"] == 4


def test_train_on_several_processes_is_checked_before_any_process_starts(monkeypatch, capsys):
    from tunebench.train import distributed

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(distributed, "launch", lambda *a: pytest.fail("launched despite a refused setting"))
    code = main(["train", "configs/quickstart.yaml", "--gpus", "2", "--set", "train.offload_frozen=true"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: configs/quickstart.yaml: 'train.offload_frozen': it works with "
                                        "train.method qlora or lora, train.gradient_checkpointing true or auto, on one process")
