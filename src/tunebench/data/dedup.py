"""Exact and normalised duplicate detection."""

from __future__ import annotations

import re
import unicodedata

from tunebench.data.records import Example, Problem

_SPACE = re.compile(r"\s+")


def normalize_text(text: str) -> str:
    """NFKC, lower case, whitespace removed: full-width/half-width and spacing variants compare equal."""
    return _SPACE.sub("", unicodedata.normalize("NFKC", text).lower())


def drop_duplicates(examples: list[Example]) -> tuple[list[Example], list[Problem]]:
    """Keep the first of each exact or normalised duplicate; report the others."""
    exact: dict[tuple, Example] = {}
    normal: dict[tuple, Example] = {}
    kept, problems = [], []
    for example in examples:
        key = tuple((m["role"], m["content"]) for m in example.messages)
        norm = tuple((m["role"], normalize_text(m["content"])) for m in example.messages)
        if key in exact:
            problems.append(Problem(example.origin, None, f"exact duplicate of {exact[key].origin}", "duplicate"))
            continue
        if norm in normal:
            problems.append(Problem(example.origin, None,
                                    f"duplicate of {normal[norm].origin} after normalising width, case and spaces",
                                    "duplicate"))
            continue
        exact[key] = normal[norm] = example
        kept.append(example)
    return kept, problems
