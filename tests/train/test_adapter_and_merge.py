import json

import pytest
import torch

from tunebench.train.merge import merge
from tunebench.train.push import push


def ids():
    return torch.tensor([[2, 10354, 64352, 237711, 107, 85141, 107]])


def test_adapter_loads_with_plain_peft_and_changes_logits(lora_run, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        before = base(ids()).logits
    model = PeftModel.from_pretrained(base, str(lora_run.adapter)).eval()  # no tunebench import involved
    with torch.no_grad():
        after = model(ids()).logits
    assert not torch.allclose(before, after, atol=1e-4)
    # the same logits tunebench's own loader gives
    from tunebench.models.trained import load_for_inference

    loaded = load_for_inference(str(lora_run.root))
    assert loaded.template == "course"
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids()).logits, after)


def test_merge_equals_base_plus_adapter(lora_run):
    from transformers import AutoModelForCausalLM

    from tunebench.models.trained import load_for_inference

    with torch.no_grad():
        expected = load_for_inference(str(lora_run.root)).model(ids()).logits
    out = merge(lora_run.root)
    merged = AutoModelForCausalLM.from_pretrained(out).eval()  # plain transformers
    assert not any("lora" in name for name in merged.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(merged(ids()).logits, expected, atol=1e-5, rtol=1e-4)


def test_push_dry_run_writes_card_and_never_the_token(lora_run, tmp_path, monkeypatch):
    secret = "hf_SECRET_TOKEN_123456"
    monkeypatch.setenv("HF_TOKEN", secret)
    out = tmp_path / "upload"
    push(lora_run.root, "me/tiny-ja", dry_run=out)
    names = sorted(p.name for p in out.iterdir())
    assert {"README.md", "adapter_config.json", "adapter_model.safetensors", "tunebench.json"} <= set(names)
    card = (out / "README.md").read_text()
    assert "base_model:" in card and "| lora_r | 16 |" in card and "| learning_rate | 0.05 |" in card
    for path in out.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


def test_merge_never_loads_a_4bit_base(lora_run, tmp_path, monkeypatch):
    import tunebench.models.trained as trained

    calls = []
    real = trained.load_base_model

    def recording(config, dtype, quantize_4bit=False, device=None):
        calls.append((quantize_4bit, dtype))
        return real(config, dtype, quantize_4bit=quantize_4bit, device=device)

    monkeypatch.setattr(trained, "load_base_model", recording)
    merge(lora_run.root, tmp_path / "merged")
    assert calls == [(False, torch.float32)]  # CPU: fp32 (bf16 on a GPU), never NF4


def test_push_dry_run_refuses_a_folder_that_holds_files(lora_run, tmp_path):
    from tunebench.errors import ConfigError

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.txt").write_text("years of work")
    with pytest.raises(ConfigError, match="not an empty folder"):
        push(lora_run.root, "me/tiny-ja", dry_run=mine)
    assert (mine / "thesis.txt").read_text() == "years of work"
    empty = tmp_path / "empty"
    empty.mkdir()
    push(lora_run.root, "me/tiny-ja", dry_run=empty)  # an empty folder is fine
    assert (empty / "README.md").exists()


def test_push_dry_run_into_the_run_never_touches_it(lora_run):
    from tunebench.errors import ConfigError

    before = sorted(str(p.relative_to(lora_run.root)) for p in lora_run.root.rglob("*"))
    for target in (lora_run.root, lora_run.adapter, lora_run.root / "new-inside"):
        with pytest.raises(ConfigError, match="the run"):
            push(lora_run.root, "me/tiny-ja", dry_run=target)
    assert sorted(str(p.relative_to(lora_run.root)) for p in lora_run.root.rglob("*")) == before


def test_push_publishes_no_local_paths(lora_run, tmp_path, tiny_model_dir):
    out = tmp_path / "upload"
    push(lora_run.root, "me/tiny-ja", dry_run=out)
    card = (out / "README.md").read_text()
    assert "- `d.jsonl` (weight 1.0)" in card
    local = str(lora_run.root.parent)  # the data file and the run live here
    for path in out.rglob("*"):
        if path.is_file() and path.suffix != ".safetensors":
            text = path.read_text(encoding="utf-8")
            assert local not in text and str(tiny_model_dir) not in text, path
    # a local base model has no public id: the adapter names none rather than a path on this disk
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] is None
    # the run's own adapter still names the base it was trained from
    assert json.loads((lora_run.adapter / "adapter_config.json").read_text())["base_model_name_or_path"]


def test_published_names_use_hub_ids():
    from tunebench.train.push import public_adapter_config, public_model_id, public_source

    assert public_model_id("embedded:gemma-3-270m") == "google/gemma-3-270m"
    assert public_model_id("llm-jp/llm-jp-3-13b") == "llm-jp/llm-jp-3-13b"
    assert public_model_id("meta-llama/Llama-3.1-8B") == "meta-llama/Llama-3.1-8B"
    assert public_source("data/train.jsonl") == "train.jsonl"
    assert public_model_id("/home/me/.cache/tunebench/models/gemma") is None
    assert public_source("/home/me/private/train.jsonl") == "train.jsonl"
    assert public_source("megagonlabs/instruction_ja") == "megagonlabs/instruction_ja"
    assert public_source("builtin:ja-instruct-megagon") == "builtin:ja-instruct-megagon"
    adapter = json.loads(public_adapter_config(
        json.dumps({"base_model_name_or_path": "/home/me/.cache/tunebench/models/gemma-3-270m-a5fd"}),
        "embedded:gemma-3-270m"))
    assert adapter["base_model_name_or_path"] == "google/gemma-3-270m"


def test_model_card_with_nothing_scored_says_so_instead_of_crashing():
    from tunebench.train.push import model_card

    scores = {"mean": None, "ci_low": None, "ci_high": None, "scored": 0, "unscored": 100}
    card = model_card({"base_model": "embedded:gemma-3-270m", "method": "lora"}, {"train": {}, "data": {}}, scores, "me/x")
    assert "No judge scores recorded." in card
