"""Language gate: how much of an answer is written in Japanese, counted without asking a judge.

ELYZA-tasks-100's grading notes take a point off for unnatural Japanese, and an answer in English
or code-switched mid-sentence is the commonest way a small fine-tune fails that. A character count
catches it for free: the share of letters that are kana or kanji. Digits, punctuation, spaces and
symbols are not counted either way, so "2024年", "(例)" or a list of numbers does not move it.
"""

from __future__ import annotations

import unicodedata

DEFAULT_THRESHOLD = 0.5  # at least half the letters Japanese
GATE_REASON = "language gate: {share:.0%} of the letters are Japanese (threshold {threshold:.0%})"


def is_japanese_char(char: str) -> bool:
    code = ord(char)
    return (0x3040 <= code <= 0x30FF  # hiragana, katakana
            or 0x31F0 <= code <= 0x31FF  # katakana phonetic extensions
            or 0xFF66 <= code <= 0xFF9F  # half-width katakana
            or 0x3400 <= code <= 0x4DBF or 0x4E00 <= code <= 0x9FFF or 0xF900 <= code <= 0xFAFF  # kanji
            or 0x20000 <= code <= 0x2FA1F  # rare kanji
            or char in "々〆ヵヶー")


def japanese_share(text: str) -> float:
    """Share of the letters in `text` that are Japanese (kana or kanji); 0.0 for text with no letters."""
    letters = [c for c in text if is_japanese_char(c) or unicodedata.category(c).startswith("L")]
    if not letters:
        return 0.0
    return sum(1 for c in letters if is_japanese_char(c)) / len(letters)


def fails_gate(text: str, threshold: float = DEFAULT_THRESHOLD) -> bool:
    return japanese_share(text) < threshold


def gated_score(judge_score: int | None, strict: bool) -> int | None:
    """ELYZA's 'unnatural Japanese' rule for an answer under the threshold: one point off the judge's
    score (never below 1), or 1 outright in strict mode (no judge call needed)."""
    if strict:
        return 1
    return None if judge_score is None else max(1, judge_score - 1)


def apply_language_gate(items: list, judgments: dict[object, list[dict]], threshold: float, strict: bool
                        ) -> dict[object, list[dict]]:
    """Judgments with the gate applied to answers under `threshold`: the judge's score one point lower,
    or in strict mode one record scoring 1 (such answers were not sent to the judge)."""
    out = {}
    for item in items:
        share = japanese_share(item.output)
        records = judgments.get(item.task_id, [])
        if share >= threshold:
            out[item.task_id] = records
            continue
        reason = GATE_REASON.format(share=share, threshold=threshold)
        if strict:
            out[item.task_id] = [{"task_id": item.task_id, "sample": 0, "score": 1, "reason": reason, "error": None,
                                  "language_gate": True}]
        else:
            out[item.task_id] = [{**r, "judge_score": r["score"], "score": gated_score(r["score"], False),
                                  "reason": f"{reason}; −1. {r['reason'] or ''}".strip(), "language_gate": True}
                                 for r in records]
    return out


def language_summary(items: list, threshold: float) -> dict:
    """Per-task Japanese share and the answers under the threshold, for reports."""
    shares = {item.task_id: japanese_share(item.output) for item in items}
    return {"threshold": threshold, "flagged": [t for t, s in shares.items() if s < threshold], "japanese_share": shares}
