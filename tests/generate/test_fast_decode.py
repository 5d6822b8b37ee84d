"""The fast decode path: merged LoRA adapter, stop strings checked every few tokens, static KV cache.
Each gives the same greedy answers as the plain path (float64, so no near-tie among 262,144 logits
flips between two summation orders)."""

import hashlib

import pytest
import torch

from tunebench.config import GenerateConfig
from tunebench.generate.engine import Generator, uses_static_cache
from tunebench.generate.merge_adapter import is_quantized, merge_for_generation, should_merge
from tunebench.generate.stops import tokens_until_stop
from tunebench.models.trained import load_for_inference

LIVELY = dict(repetition_penalty=1.0, no_repeat_ngram_size=1)  # a random model's greedy text never repeats
QUESTIONS = ["日本の首都は？", "春の詩を書いてください。長めにお願いします。", "1+1は？", "こんにちは、元気ですか？",
             "おすすめの本を三冊教えてください。"]


def conversations(questions=QUESTIONS):
    return [[{"role": "user", "content": q}] for q in questions]


def file_hashes(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_merged_adapter_answers_as_the_adapter_does_and_leaves_its_files(lora_run, tiny_model_dir):
    before = file_hashes(lora_run.adapter)
    plain = load_for_inference(str(lora_run.root), dtype=torch.float64)
    shared = load_for_inference(str(lora_run.root), dtype=torch.float64)
    ids = torch.tensor([[2, 10354, 64352, 237711, 107]])
    with torch.no_grad():
        adapter_logits = shared.model(ids).logits
    settings = GenerateConfig(max_new_tokens=10, batch_size=2, **LIVELY)
    unmerged = Generator(plain.model, plain.tokenizer, "course", GenerateConfig(**{**vars(settings), "merge_adapter": False}))
    merged = Generator(shared.model, shared.tokenizer, "course", settings)  # merge_adapter: auto
    assert any("lora_" in name for name, _ in unmerged.model.named_modules())
    assert not any("lora_" in name for name, _ in merged.model.named_modules())
    a, b = unmerged.generate(conversations()), merged.generate(conversations())
    assert [x.text for x in a] == [x.text for x in b] and len({x.text for x in a}) == len(QUESTIONS)
    base = load_for_inference(str(tiny_model_dir), dtype=torch.float64)  # the adapter does change the answers
    assert [x.text for x in Generator(base.model, base.tokenizer, "course", settings).generate(conversations())] != \
        [x.text for x in a]
    with torch.no_grad():  # the PeftModel the pipeline shares with the reference NLL still computes the same
        torch.testing.assert_close(shared.model(ids).logits, adapter_logits)
    assert file_hashes(lora_run.adapter) == before


def test_merge_decision_never_merges_a_quantised_base(lora_run):
    assert should_merge("auto", lora=True, quantized=False) and should_merge(True, lora=True, quantized=False)
    assert not should_merge(False, lora=True, quantized=False)
    for setting in ("auto", True, False):
        assert not should_merge(setting, lora=True, quantized=True)  # 4-bit: the adapter is kept
        assert not should_merge(setting, lora=False, quantized=False)  # prefix/prompt tuning, full models
    loaded = load_for_inference(str(lora_run.root))
    loaded.model.base_model.model.hf_quantizer = object()  # what transformers sets on a bitsandbytes load
    assert is_quantized(loaded.model)
    for setting in ("auto", True):
        kept = merge_for_generation(loaded.model, setting)
        assert kept is loaded.model and any("lora_" in name for name, _ in kept.named_modules())


def test_stop_strings_checked_every_few_tokens_cut_where_per_token_checks_do(tiny_model_dir):
    tiny = load_for_inference(str(tiny_model_dir), dtype=torch.float64)
    free = Generator(tiny.model, tiny.tokenizer, "course", GenerateConfig(max_new_tokens=24, stop=[], **LIVELY))
    texts = [a.text for a in free.generate(conversations())]
    # stop strings the answers really contain: a character from the middle of the first three answers
    stops = [t[len(t) // 2] for t in texts[:3] if t.strip()]
    config = GenerateConfig(max_new_tokens=24, batch_size=3, stop=stops, **LIVELY)
    per_token = Generator(tiny.model, tiny.tokenizer, "course", config, stop_check_every=None)
    every_3 = Generator(tiny.model, tiny.tokenizer, "course", config, stop_check_every=3)
    a, b = per_token.generate(conversations()), every_3.generate(conversations())
    assert [(x.text, x.new_tokens, x.stopped) for x in a] == [(x.text, x.new_tokens, x.stopped) for x in b]
    assert sum(x.stopped and x.new_tokens < 24 for x in a) >= 3  # the stop strings did cut answers short


def test_tokens_until_stop_finds_the_first_prefix_holding_a_stop(tokenizer):
    tokens = tokenizer.encode("答えは東京です。\n### 指示\n次", add_special_tokens=False)
    n = tokens_until_stop(tokenizer, tokens, ["### 指示"])
    assert "### 指示" in tokenizer.decode(tokens[:n]) and "### 指示" not in tokenizer.decode(tokens[: n - 1])
    assert tokens_until_stop(tokenizer, tokens, ["存在しない"]) is None


def test_static_cache_on_cpu_gives_the_same_greedy_answers(tiny_model_dir):
    """generate.compile: true on CPU runs the static KV cache (transformers compiles on GPUs only) with
    prompts padded to a multiple of 64: the same answers as the dynamic cache."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert uses_static_cache("auto", cuda, task_set=True) and not uses_static_cache("auto", cpu, task_set=True)
    assert not uses_static_cache("auto", cuda, task_set=False)  # serve, the local judge: one-off shapes
    assert uses_static_cache(True, cpu, task_set=False) and not uses_static_cache(False, cuda, task_set=True)
    tiny = load_for_inference(str(tiny_model_dir), dtype=torch.float64)
    settings = dict(max_new_tokens=10, batch_size=2, **LIVELY)
    dynamic = Generator(tiny.model, tiny.tokenizer, "course", GenerateConfig(**settings))
    static = Generator(tiny.model, tiny.tokenizer, "course", GenerateConfig(compile=True, **settings))
    a = dynamic.generate(conversations())
    seen = []
    real = tiny.model.generate

    def spy(**kwargs):
        seen.append((kwargs.get("cache_implementation"), kwargs["input_ids"].shape[1]))
        return real(**kwargs)

    tiny.model.generate = spy
    b = static.generate(conversations())
    assert seen and all(cache == "static" and width % 64 == 0 for cache, width in seen)
    assert [(x.text, x.new_tokens) for x in a] == [(x.text, x.new_tokens) for x in b]


def test_a_failing_compiled_decode_falls_back_under_auto_and_is_raised_under_true(tiny_model_dir, monkeypatch, caplog):
    from tunebench.generate import engine

    tiny = load_for_inference(str(tiny_model_dir), dtype=torch.float64)
    settings = dict(max_new_tokens=6, batch_size=2, **LIVELY)
    expected = [a.text for a in Generator(tiny.model, tiny.tokenizer, "course", GenerateConfig(**settings))
                .generate(conversations())]
    monkeypatch.setattr(engine, "uses_static_cache", lambda setting, device, task_set: setting is not False)  # as on a GPU
    real, calls = tiny.model.generate, []

    def compile_fails(**kwargs):
        calls.append(kwargs.get("cache_implementation"))
        if kwargs.get("cache_implementation") == "static":
            raise RuntimeError("BackendCompilerFailed: inductor raised an error\nlong traceback")
        return real(**kwargs)

    tiny.model.generate = compile_fails
    auto = Generator(tiny.model, tiny.tokenizer, "course", GenerateConfig(compile="auto", **settings))
    assert [a.text for a in auto.generate(conversations())] == expected
    assert calls[:2] == ["static", None] and "static" not in calls[2:]  # tried once, then the plain path
    assert "generate.compile: the static-cache decode step failed (RuntimeError: BackendCompilerFailed" in caplog.text
    with pytest.raises(RuntimeError, match="BackendCompilerFailed"):
        Generator(tiny.model, tiny.tokenizer, "course", GenerateConfig(compile=True, **settings)).generate(conversations())
