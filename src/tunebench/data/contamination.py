"""Guard against evaluation data leaking into training data.

A training example is contaminated when the normalised text of its user turns equals an
evaluation input, or shares a long character n-gram with one (character n-grams because Japanese
has no spaces; 20 characters is far longer than common phrases, so hits are copied text).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from tunebench.data.dedup import normalize_text
from tunebench.data.records import Example, Problem
from tunebench.errors import DataError
from tunebench.tasksets import load_tasks

NGRAM = 20
log = logging.getLogger(__name__)


@dataclass
class EvalIndex:
    """Normalised evaluation inputs and their n-grams, for fast overlap checks."""

    exact: dict[str, str]
    ngrams: dict[str, str]


def build_eval_index(task_sets: list[str]) -> EvalIndex:
    """Index the inputs of the named task sets; a set that cannot be found is skipped with a warning."""
    exact: dict[str, str] = {}
    ngrams: dict[str, str] = {}
    for name in task_sets:
        try:
            tasks = load_tasks(name)
        except DataError as exc:
            log.warning("contamination check skips %s: %s", name, exc)
            continue
        for task in tasks:
            label = f"{name} task {task.task_id}"
            text = normalize_text(task.input)
            exact.setdefault(text, label)
            for gram in char_ngrams(text):
                ngrams.setdefault(gram, label)
    return EvalIndex(exact, ngrams)


def char_ngrams(text: str, n: int = NGRAM) -> set[str]:
    return {text[i : i + n] for i in range(len(text) - n + 1)}


def find_contamination(examples: list[Example], index: EvalIndex) -> list[Problem]:
    """One problem per training example whose user text overlaps an evaluation input."""
    problems = []
    for example in examples:
        text = normalize_text(example.user_text())
        hit = index.exact.get(text)
        if hit is None:
            hit = next((index.ngrams[g] for g in char_ngrams(text) if g in index.ngrams), None)
            kind = f"shares a {NGRAM}-character passage with"
        else:
            kind = "is identical to"
        if hit is not None:
            problems.append(Problem(example.origin, "instruction", f"{kind} {hit} (evaluation data)", "contamination"))
    return problems
