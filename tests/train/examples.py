"""Small inputs shared by the training tests."""

from tunebench.data.batches import pad_batch
from tunebench.data.templates import render_segments
from tunebench.data.tokens import encode_segments

QUESTIONS_AND_ANSWERS = [("日本の首都は？", "東京です。"), ("春の季語を三つ挙げて", "桜、菜の花、蛙")]


def course_batch(tokenizer) -> dict:
    """Two question/answer rows in the course template (prompt labels -100), right-padded into one batch."""
    rows = []
    for q, a in QUESTIONS_AND_ANSWERS:
        enc = encode_segments(render_segments([{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                                              "course"), tokenizer)
        rows.append({"input_ids": enc.input_ids, "labels": enc.labels})
    return pad_batch(rows, tokenizer.pad_token_id)
