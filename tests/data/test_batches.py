"""Packing: boundaries, position ids, and no attention across packed examples."""

import torch

from tunebench.data.batches import pack_examples, pad_batch
from tunebench.data.templates import render_segments
from tunebench.data.tokens import IGNORE, encode_segments


def encode(tokenizer, question, answer):
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return encode_segments(render_segments(messages, "course"), tokenizer)


def test_pack_boundaries_and_positions(tokenizer):
    a, b, c = (encode(tokenizer, q, a) for q, a in [("質問一", "答え一"), ("質問二です", "答え二"), ("三", "三番")])
    rows = pack_examples([a, b, c], max_len=len(a.input_ids) + len(b.input_ids))
    assert len(rows) == 2
    assert rows[0]["input_ids"] == a.input_ids + b.input_ids
    assert rows[0]["labels"] == a.labels + b.labels
    assert rows[0]["position_ids"] == list(range(len(a.input_ids))) + list(range(len(b.input_ids)))
    assert rows[1]["input_ids"] == c.input_ids
    # every example starts with a masked prompt token: no loss crosses a boundary
    assert rows[0]["labels"][len(a.input_ids)] == IGNORE


def test_packed_logits_equal_separate_logits(tokenizer, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    # float64: packed and separate runs differ only in summation order (≈1e-16 relative per op, a few dozen
    # ops deep), so 1e-9 holds on any CPU, while attention leaking across the packed boundary moves logits by >1e-3
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa", dtype=torch.float64).eval()
    a, b = encode(tokenizer, "日本の首都は？", "東京"), encode(tokenizer, "一足す一は？", "二です")
    (row,) = pack_examples([a, b], max_len=512)
    batch = pad_batch([row], pad_id=tokenizer.pad_token_id)
    assert "attention_mask" not in batch
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        alone_a = model(input_ids=torch.tensor([a.input_ids])).logits[0]
        alone_b = model(input_ids=torch.tensor([b.input_ids])).logits[0]
    n = len(a.input_ids)
    torch.testing.assert_close(packed[:n], alone_a, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(packed[n : n + len(b.input_ids)], alone_b, atol=1e-9, rtol=1e-9)


def test_pad_batch_rounds_width_and_masks_padding():
    batch = pad_batch([{"input_ids": [5, 6, 7], "labels": [IGNORE, 6, 7]}, {"input_ids": [5], "labels": [IGNORE]}],
                      pad_id=0, multiple_of=8)
    assert batch["input_ids"].shape == (2, 8)
    assert batch["labels"][1].tolist() == [IGNORE] * 8
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0, 0]]
