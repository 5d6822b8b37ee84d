import pytest

from tunebench.config import Config, load_config
from tunebench.errors import ConfigError


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_presets_load_and_match_the_course_sample():
    config = load_config("configs/llm-jp-3-13b-qlora.yaml")
    assert config.model.name_or_path == "llm-jp/llm-jp-3-13b"
    t = config.train
    assert (t.method, t.lora_r, t.lora_alpha, t.lora_dropout) == ("qlora", 16, 32, 0.05)
    assert (t.per_device_train_batch_size, t.gradient_accumulation_steps, t.num_train_epochs) == (2, 4, 1.0)
    assert (t.learning_rate, t.warmup_steps, t.save_steps, t.save_total_limit, t.logging_steps) == (2e-4, 10, 100, 2, 10)
    assert config.data.max_seq_length == 512 and config.data.template == "course"
    quick = load_config("configs/quickstart.yaml")
    assert quick.model.name_or_path == "embedded:gemma-3-270m"
    assert quick.data.sources[0].path == "builtin:ja-instruct-megagon"


def test_misspelled_key_names_dotted_path_and_suggestion(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'train\.learning_rat'; did you mean 'train\.learning_rate'"):
        load_config(write(tmp_path, "train:\n  learning_rat: 1e-4\n"))
    with pytest.raises(ConfigError, match=r"unknown key 'trian'; did you mean 'train'"):
        load_config(write(tmp_path, "trian: {}\n"))


def test_wrong_type_names_expected_type(tmp_path):
    with pytest.raises(ConfigError, match=r"'train\.lora_r' expects an integer, got 'sixteen'"):
        load_config(write(tmp_path, "train:\n  lora_r: sixteen\n"))
    with pytest.raises(ConfigError, match=r"'train\.method' must be one of .*did you mean 'qlora'"):
        load_config(write(tmp_path, "train:\n  method: qlra\n"))
    with pytest.raises(ConfigError, match=r"'data\.sources\[0\]\.weight' expects a number"):
        load_config(write(tmp_path, "data:\n  sources:\n    - {path: a.jsonl, weight: lots}\n"))


def test_set_overrides_parse_values_and_are_validated(tmp_path):
    config = load_config(write(tmp_path, "name: x\n"), ["train.learning_rate=1e-4", "train.max_steps=5",
                                                        "data.sources=[{path: a.jsonl}]", "judge.judge=null"])
    assert config.train.learning_rate == 1e-4 and config.train.max_steps == 5
    assert config.data.sources[0].path == "a.jsonl" and config.judge.judge is None
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(None, ["train.learning_rate"])
    with pytest.raises(ConfigError, match=r"did you mean 'train\.warmup_steps'"):
        load_config(None, ["train.warmup=3"])


def test_defaults_and_name_from_file(tmp_path):
    assert isinstance(load_config(None), Config)
    assert load_config(write(tmp_path, "")).name == "c"


def test_yaml_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="c.yaml: not valid YAML"):
        load_config(write(tmp_path, "train: [unclosed\n"))
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_missing_local_model_path_is_named():
    from tunebench.errors import ModelError
    from tunebench.models.tokenizer import resolve_model_path

    with pytest.raises(ModelError, match=r"\./nope: no such model folder or run directory"):
        resolve_model_path("./nope")
    assert resolve_model_path("llm-jp/llm-jp-3-13b") == "llm-jp/llm-jp-3-13b"  # hub ids pass through


def test_readme_lists_every_config_key():
    import dataclasses
    from pathlib import Path

    from tunebench import config as c

    readme = Path("README.md").read_text(encoding="utf-8")
    for section, cls in [("model", c.ModelConfig), ("data", c.DataConfig), ("data.sources[]", c.SourceConfig),
                         ("train", c.TrainConfig), ("generate", c.GenerateConfig), ("judge", c.JudgeConfig)]:
        for field in dataclasses.fields(cls):
            assert f"`{section}.{field.name}`" in readme, f"{section}.{field.name} missing from README"


def test_saved_and_pushed_config_hold_no_credentials(tmp_path):
    from tunebench.config import dump_config
    from tunebench.train.push import public_run_config

    url = "https://alice:hunter2@judge.example.com:8443/v1?api_key=SECRET123&region=eu"
    config = load_config(None, [f"judge.base_url={url}"])
    dump_config(config, tmp_path / "config.yaml")
    saved = (tmp_path / "config.yaml").read_text()
    for secret in ("alice", "hunter2", "SECRET123"):
        assert secret not in saved and secret not in public_run_config(saved)
    assert "https://judge.example.com:8443/v1?region=eu" in saved
    assert config.judge.base_url == url  # the run itself still uses what the user gave


@pytest.mark.parametrize("value, expected", [("###", "###"), ("# note", "# note"), ("null", None), ("~", None),
                                             ("", None)])
def test_set_value_that_yaml_reads_as_a_comment_stays_text(value, expected):
    assert load_config(None, [f"name={value}"]).name == expected  # '###' was silently null
