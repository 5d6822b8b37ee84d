"""The fast decode path: merged LoRA adapter, stop strings checked every few tokens (the captured
decode loop: test_graph_decode.py).
Each gives the same greedy answers as the plain path (float64, so no near-tie among 262,144 logits
flips between two summation orders)."""

import hashlib

import torch

from tunebench.config import GenerateConfig
from tunebench.generate.engine import Generator
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
