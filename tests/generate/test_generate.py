import json

import pytest

from tunebench.config import GenerateConfig
from tunebench.errors import ConfigError
from tunebench.generate import engine
from tunebench.generate.answers import generate_answers
from tunebench.generate.engine import Generator, clean_answer
from tunebench.models.trained import load_for_inference, pick_template

LIVELY = dict(repetition_penalty=1.0, no_repeat_ngram_size=1)  # a random model's greedy text never repeats


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_for_inference(str(tiny_model_dir))


@pytest.fixture()
def tasks_file(tmp_path):
    path = tmp_path / "tasks.jsonl"
    inputs = ["日本の首都は？", "短い詩を書いてください。季節は春です。", "1+1は？", "自己紹介をしてください。",
              "おすすめの本を三冊教えてください。理由も添えてください。", "こんにちは"]
    path.write_text("".join(json.dumps({"task_id": i, "input": s}, ensure_ascii=False) + "\n"
                            for i, s in enumerate(inputs)), encoding="utf-8")
    return path


def test_clean_answer_cuts_template_residue():
    assert clean_answer("東京です。\n### 指示\n次の質問", ["### 指示", "### 回答"]) == ("東京です。", True)
    assert clean_answer("  答え  ", ["### 指示"]) == ("答え", False)


def test_batched_greedy_equals_one_at_a_time(tiny_model_dir):
    """In float64: left padding changes the summation order by ~1e-16, so greedy choices flip only on exact
    ties, on any CPU (in float32 a near-tie among 262,144 logits can flip on one CPU and not another)."""
    import torch

    tiny = load_for_inference(str(tiny_model_dir), dtype=torch.float64)
    assert next(tiny.model.parameters()).dtype == torch.float64
    prompts = [[{"role": "user", "content": q}] for q in ["日本の首都は？", "春の詩を書いてください。長めにお願いします。",
                                                          "1+1は？", "こんにちは、元気ですか？"]]
    single = Generator(tiny.model, tiny.tokenizer, "course", GenerateConfig(max_new_tokens=12, batch_size=1, **LIVELY))
    b = single.generate(prompts)
    assert all(x.text for x in b) and len({x.text for x in b}) == 4
    # batch 2: the prompts are sorted by length into two batches (the two longest together) and the answers
    # come back in input order
    for size in (4, 2):
        batched = Generator(tiny.model, tiny.tokenizer, "course", GenerateConfig(max_new_tokens=12, batch_size=size,
                                                                                 **LIVELY))
        a = batched.generate(prompts)
        assert [x.text for x in a] == [x.text for x in b] and [x.index for x in a] == [0, 1, 2, 3]


def test_generate_writes_task_order_and_resumes_after_crash(tmp_path, tiny_model_dir, tasks_file, monkeypatch):
    config = GenerateConfig(max_new_tokens=6, batch_size=2, **LIVELY)
    out = tmp_path / "predictions.jsonl"
    real = Generator.generate_batch
    calls = []
    crashed = []

    def crash_on_second_batch(self, prompts, *args, **kwargs):
        calls.append(len(prompts))
        if len(calls) == 2 and not crashed:
            crashed.append(True)
            raise RuntimeError("CUDA error: the machine fell over")
        return real(self, prompts, *args, **kwargs)

    monkeypatch.setattr(Generator, "generate_batch", crash_on_second_batch)
    with pytest.raises(RuntimeError):
        generate_answers(str(tiny_model_dir), str(tasks_file), out, config, template="course")
    partial = out.with_name(out.name + ".partial")
    kept = [json.loads(line) for line in partial.read_text(encoding="utf-8").splitlines()]
    assert len(kept) == 2 and not out.exists()

    calls.clear()
    result = generate_answers(str(tiny_model_dir), str(tasks_file), out, config, template="course")
    assert (result.answered, result.reused) == (4, 2) and calls == [2, 2]  # only the unfinished tasks
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["task_id"] for r in rows] == list(range(6)) and all(r["output"] for r in rows)
    for row in kept:  # finished answers were kept as they were
        assert rows[row["task_id"]] == row
    assert not partial.exists()


def test_template_rules(tiny):
    assert pick_template("course", None, tiny.tokenizer) == "course"
    with pytest.raises(ConfigError, match="trained with template 'course'"):
        pick_template("course", "alpaca-ja", tiny.tokenizer)
    with pytest.raises(ConfigError, match="a plain model needs --template"):
        pick_template(None, None, tiny.tokenizer)


def test_empty_answer_is_retried_with_eos_suppressed(tiny, monkeypatch):
    generator = Generator(tiny.model, tiny.tokenizer, "course", GenerateConfig(max_new_tokens=4, **LIVELY))
    seen = []
    real = Generator.generate_batch

    def first_empty(self, prompts, max_new_tokens=None, min_new_tokens=0, **kwargs):
        seen.append(min_new_tokens)
        answers = real(self, prompts, max_new_tokens, min_new_tokens, **kwargs)
        if min_new_tokens == 0:
            answers[0].text = ""
        return answers

    monkeypatch.setattr(Generator, "generate_batch", first_empty)
    (answer,) = generator.generate([[{"role": "user", "content": "はい"}]])
    assert seen == [0, engine.EMPTY_RETRY_MIN_TOKENS] and answer.text


def test_auto_batch_size_from_kv_cache_bytes(tiny, gemma_dir):
    from transformers import AutoConfig, LlamaConfig

    from tunebench.generate.engine import auto_batch_size, kv_bytes_per_token

    gemma = AutoConfig.from_pretrained(gemma_dir)  # 18 layers × 1 kv head × 256 dims × k,v × bf16
    assert kv_bytes_per_token(gemma) == 18 * 1 * 256 * 2 * 2
    llmjp13b = LlamaConfig(hidden_size=5120, num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40)
    assert kv_bytes_per_token(llmjp13b) == 40 * 40 * 128 * 2 * 2

    class Fake:  # a model on "cuda" with a given config, for the sizing arithmetic alone
        def __init__(self, config):
            self.config = config

        def parameters(self):
            import torch

            yield torch.empty(0, device="meta")

    free = 70 * 2**30  # an H100 after loading a small model
    assert auto_batch_size(Fake(gemma), 100, 200, 512, free_bytes=free) == 100  # all tasks at once
    assert auto_batch_size(Fake(llmjp13b), 100, 200, 512, free_bytes=free) == int(free * 0.4 // (819200 * 712))
    assert auto_batch_size(tiny.model, 100, 200, 512) == 8  # CPU


def test_new_tokens_stop_at_padding_of_finished_rows(tiny):
    generator = Generator(tiny.model, tiny.tokenizer, "course", GenerateConfig(max_new_tokens=5, **LIVELY))
    pad = tiny.tokenizer.pad_token_id

    class Padded:  # the model finishes row 0 after 2 tokens; generate fills the rest with pad
        def __init__(self, model):
            self.model = model

        def parameters(self):
            return self.model.parameters()

        def generate(self, input_ids, **kwargs):
            import torch

            new = torch.tensor([[300, 301, pad, pad, pad], [302, 303, 304, 305, 306]])
            return torch.cat([input_ids, new], dim=1)

    generator.model = Padded(tiny.model)
    a, b = generator.generate_batch([[2, 5, 6], [2, 7]])
    assert (a.new_tokens, a.stopped) == (2, True) and (b.new_tokens, b.stopped) == (5, False)


def test_generate_records_validation_beside_predictions(tmp_path, tiny_model_dir, tasks_file):
    out = tmp_path / "predictions.jsonl"
    generate_answers(str(tiny_model_dir), str(tasks_file), out, GenerateConfig(max_new_tokens=3, **LIVELY),
                     template="course")
    record = json.loads((tmp_path / "validation.json").read_text())
    assert record == {"file": "predictions.jsonl", "ok": True, "tasks": 6, "issues": []}


def test_defaults_guard_against_repetition_loops(tiny):
    """The course's repetition_penalty 1.2 and the template's stop strings reach model.generate."""
    kwargs = Generator(tiny.model, tiny.tokenizer, "course", GenerateConfig()).generation_kwargs()
    assert kwargs["repetition_penalty"] == 1.2 and kwargs["max_new_tokens"] == 512
    assert kwargs["stop_strings"] == ["### 指示", "### 回答"] and kwargs["eos_token_id"] == [tiny.tokenizer.eos_token_id]
    assert kwargs["do_sample"] is False and kwargs["temperature"] is None


def test_generate_into_a_run_records_the_settings_the_predictions_came_from(tmp_path, tiny_model_dir, monkeypatch):
    """`tunebench generate RUN` replaces the run's submission; the settings file beside it follows, so the
    next `tunebench run` compares against what really made the answers."""
    import shutil

    import yaml

    from tunebench.cli import main
    from tunebench.config import load_config

    run = tmp_path / "run"
    adapter = run / "adapter"
    shutil.copytree(tiny_model_dir, adapter)
    config = load_config(None, [f"model.name_or_path={tiny_model_dir}"])
    from tunebench.config import dump_config

    dump_config(config, adapter / "config.yaml")
    (adapter / "tunebench.json").write_text(json.dumps({"base_model": str(tiny_model_dir), "method": "full",
                                                        "template": "course"}))
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text(json.dumps({"task_id": 0, "input": "こんにちは"}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert main(["generate", str(run), "--tasks", str(tasks), "--set", "generate.max_new_tokens=3"]) == 0
    settings = json.loads((run / "predictions.settings.json").read_text())
    assert settings["generate"]["max_new_tokens"] == 3
    assert yaml.safe_load((adapter / "config.yaml").read_text())["generate"]["max_new_tokens"] == 512
