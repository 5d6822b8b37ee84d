import sys
import types

from tunebench.config import load_config, to_dict
from tunebench.train.tracking import Trackers


def test_wandb_receives_the_config_without_url_credentials(tmp_path, monkeypatch):
    sent = {}
    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: sent.update(kw) or types.SimpleNamespace(finish=lambda: None)
    monkeypatch.setitem(sys.modules, "wandb", fake)  # wandb is optional and not installed here
    config = load_config(None, ["judge.base_url=https://bob:pa55@judge.example.com/v1?token=T0KEN"])
    Trackers(["wandb"], tmp_path, to_dict(config)).close()
    assert sent["config"]["judge"]["base_url"] == "https://judge.example.com/v1"
    assert config.judge.base_url.startswith("https://bob:pa55@")  # the live config is untouched
