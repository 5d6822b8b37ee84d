"""Label masking checked token by token against independently tokenised pieces."""

import copy

from tunebench.data.batches import pad_batch
from tunebench.data.templates import render_prompt, render_segments
from tunebench.data.tokens import IGNORE, encode_prompt, encode_segments, fit_length

MESSAGES = [{"role": "user", "content": "日本の首都はどこですか？"}, {"role": "assistant", "content": "東京です。"}]


def test_course_template_text():
    segments = render_segments(MESSAGES, "course")
    assert [s.text for s in segments] == ["### 指示\n日本の首都はどこですか？\n### 回答\n", "東京です。"]
    assert [s.is_answer for s in segments] == [False, True] and segments[1].add_eos
    assert render_prompt("日本の首都はどこですか？", "course") == segments[0].text


def test_course_labels_token_by_token(tokenizer):
    enc = encode_segments(render_segments(MESSAGES, "course"), tokenizer)
    prompt = tokenizer("### 指示\n日本の首都はどこですか？\n### 回答\n")["input_ids"]  # BOS + prompt
    answer = tokenizer("東京です。", add_special_tokens=False)["input_ids"]
    assert enc.input_ids == prompt + answer + [tokenizer.eos_token_id]
    assert enc.labels == [IGNORE] * len(prompt) + answer + [tokenizer.eos_token_id]
    assert enc.input_ids.count(tokenizer.eos_token_id) == 1  # EOS exactly once, and it carries a label


def test_mask_is_by_prompt_length_not_by_search(tokenizer):
    # "### 回答" inside the instruction: a search for the marker tokens would unmask the wrong span.
    messages = [{"role": "user", "content": "次の見出しを説明して: ### 回答\n### 回答とは"},
                {"role": "assistant", "content": "見出しです。"}]
    enc = encode_segments(render_segments(messages, "course"), tokenizer)
    n_prompt = len(tokenizer(render_segments(messages, "course")[0].text)["input_ids"])
    assert all(label == IGNORE for label in enc.labels[:n_prompt])
    assert enc.labels[n_prompt:] == enc.input_ids[n_prompt:]


def test_training_prefix_equals_inference_prompt(tokenizer):
    enc = encode_segments(render_segments(MESSAGES, "course"), tokenizer)
    prompt_ids = encode_prompt(MESSAGES[:1], "course", tokenizer)
    assert enc.input_ids[: len(prompt_ids)] == prompt_ids
    assert all(label == IGNORE for label in enc.labels[: len(prompt_ids)])
    assert enc.labels[len(prompt_ids)] != IGNORE


def test_final_eos_keeps_label_when_pad_equals_eos(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.pad_token = tok.eos_token
    assert tok.pad_token_id == tok.eos_token_id
    enc = encode_segments(render_segments(MESSAGES, "course"), tok)
    batch = pad_batch([{"input_ids": enc.input_ids, "labels": enc.labels},
                       {"input_ids": enc.input_ids[:5], "labels": enc.labels[:5]}], pad_id=tok.pad_token_id)
    row = batch["labels"][0].tolist()
    n = len(enc.input_ids)
    assert row[n - 1] == tok.eos_token_id  # the real EOS is learned
    assert all(x == IGNORE for x in row[n:])  # padding (same id) is not
    assert batch["attention_mask"][1].tolist()[:5] == [1] * 5 and sum(batch["attention_mask"][1].tolist()) == 5


def test_chat_template_multi_turn_masks_every_user_turn(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = (
        "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else 'user' }}\n"
        "{{ m['content'] }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
    messages = [{"role": "user", "content": "やあ"}, {"role": "assistant", "content": "こんにちは"},
                {"role": "user", "content": "元気？"}, {"role": "assistant", "content": "元気です"}]
    segments = render_segments(messages, "chat", tok)
    assert [s.is_answer for s in segments] == [False, True, False, True]
    assert segments[1].text == "こんにちは<end_of_turn>\n"
    enc = encode_segments(segments, tok, prefix=[])
    learned = tok.decode([i for i, lab in zip(enc.input_ids, enc.labels) if lab != IGNORE])
    assert learned == "こんにちは<end_of_turn>\n元気です<end_of_turn>\n"
    masked = tok.decode([i for i, lab in zip(enc.input_ids, enc.labels) if lab == IGNORE])
    assert "やあ" in masked and "元気？" in masked and "こんにちは" not in masked
    prompt = encode_prompt(messages[:3], "chat", tok, prefix=[])
    assert enc.input_ids[: len(prompt)] == prompt


def test_overlength_truncate_and_drop(tokenizer):
    enc = encode_segments(render_segments(MESSAGES, "course"), tokenizer)
    n = len(enc.input_ids)
    cut = fit_length(enc, n - 2, "truncate")
    assert cut.truncated and len(cut.input_ids) == n - 2 and cut.labels == enc.labels[: n - 2]
    assert fit_length(enc, n - 2, "drop") is None
    assert fit_length(enc, n, "drop") is enc
    assert fit_length(enc, 3, "truncate") is None  # nothing but prompt would remain
