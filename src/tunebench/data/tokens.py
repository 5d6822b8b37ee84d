"""Turn rendered segments into token ids and labels.

Labels mask the prompt by its own token length: every segment is tokenised on its own and the
ids are concatenated, so the prompt's tokens are exactly what inference feeds the model, and no
search for "### 回答" tokens (which tokenise differently in context) is ever needed. Each answer
ends with the EOS id, labelled, so the model learns to stop; padding never touches labels, so a
tokenizer whose pad id equals its EOS id cannot mask it.
"""

from __future__ import annotations

from dataclasses import dataclass

from tunebench.data.templates import Segment, render_segments

IGNORE = -100


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False


def special_prefix(tokenizer) -> list[int]:
    """The ids the tokenizer puts before text (usually BOS), found by encoding with and without them."""
    with_special = tokenizer("a")["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    for start in range(len(with_special) - len(plain) + 1):
        if with_special[start : start + len(plain)] == plain:
            return list(with_special[:start])
    return []


def encode_segments(segments: list[Segment], tokenizer, prefix: list[int] | None = None) -> Encoded:
    """Ids and labels for rendered segments: prompt ids labelled -100, answer ids (+EOS) kept."""
    ids = list(special_prefix(tokenizer) if prefix is None else prefix)
    labels = [IGNORE] * len(ids)
    for segment in segments:
        piece = tokenizer(segment.text, add_special_tokens=False)["input_ids"]
        if segment.add_eos:
            piece = piece + [tokenizer.eos_token_id]
        ids += piece
        labels += piece if segment.is_answer else [IGNORE] * len(piece)
    return Encoded(ids, labels)


def encode_prompt(instruction_messages: list[dict[str, str]], template: str, tokenizer,
                  prefix: list[int] | None = None) -> list[int]:
    """Ids of a generation prompt: the same encoding training used for the part before an answer."""
    segments = render_segments(instruction_messages, template, tokenizer, add_generation_prompt=True)
    return encode_segments(segments, tokenizer, prefix).input_ids


def fit_length(encoded: Encoded, max_len: int, policy: str) -> Encoded | None:
    """Apply the overlength policy: 'truncate' cuts the end (answer first), 'drop' returns None.
    An example whose prompt alone fills max_len has nothing left to learn and is dropped."""
    if len(encoded.input_ids) <= max_len:
        return encoded
    if policy == "drop":
        return None
    labels = encoded.labels[:max_len]
    if all(label == IGNORE for label in labels):
        return None
    return Encoded(encoded.input_ids[:max_len], labels, truncated=True)
