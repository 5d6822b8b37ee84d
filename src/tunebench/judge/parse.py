"""Read a 1–5 score out of a judge's reply. No parsable score → None (unscored), never 0."""

from __future__ import annotations

import json
import re
import unicodedata

SCORE_KEYS = ("score", "grade", "rating", "評価", "点数", "スコア", "得点")
LABELLED = re.compile(r"(?:評価|点数|スコア|得点|score|rating|grade)\s*(?:\(1-5\))?\s*[:：=]\s*\[*\s*(\d+(?:\.\d+)?)",
                      re.IGNORECASE)
BRACKETED = re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]")
BARE_LAST_LINE = re.compile(r"^\s*\**\s*(\d)(?:\s*点)?\s*(?:/\s*5)?\s*\**\s*$")


def parse_score(reply: str | None) -> int | None:
    """The score a judge gave, 1..5, or None when there is none or it is out of range."""
    if not reply or not reply.strip():
        return None
    text = unicodedata.normalize("NFKC", reply)
    for candidate in json_objects(text):
        for key in SCORE_KEYS:
            if key in candidate:
                return in_range(candidate[key])
    labelled = LABELLED.findall(text)
    if labelled:
        return in_range(labelled[-1])  # the final verdict comes last
    bracketed = BRACKETED.findall(text)
    if bracketed:
        return in_range(bracketed[-1])
    lines = [line for line in text.strip().splitlines() if line.strip()]
    match = BARE_LAST_LINE.match(lines[-1]) if lines else None
    return in_range(match.group(1)) if match else None


def in_range(value) -> int | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    if number != int(number) or not 1 <= number <= 5:
        return None
    return int(number)


def json_objects(text: str) -> list[dict]:
    """JSON objects embedded in the text (judges often wrap them in ```json fences)."""
    found = []
    for match in re.finditer(r"\{[^{}]*\}", text):
        try:
            value = json.loads(match.group(0))
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            found.append(value)
    return found


def reason_of(reply: str) -> str:
    """The judge's reasoning: the reply without its final score line."""
    lines = reply.strip().splitlines()
    if lines and (LABELLED.search(unicodedata.normalize("NFKC", lines[-1])) or BARE_LAST_LINE.match(lines[-1])):
        lines = lines[:-1]
    return "\n".join(lines).strip()
