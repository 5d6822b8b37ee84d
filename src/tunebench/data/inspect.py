"""`tunebench data inspect`: what is in a data file, how long it is, and what the model will learn."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from tunebench.data.contamination import build_eval_index, find_contamination
from tunebench.data.dedup import drop_duplicates
from tunebench.data.pairs import encode_response, is_pair_row, row_to_pair
from tunebench.data.readers import read_raw_rows, read_source
from tunebench.data.records import Example, Problem
from tunebench.data.templates import render_segments
from tunebench.data.tokens import IGNORE, encode_segments, special_prefix

MASK_OPEN, MASK_CLOSE = "⟦", "⟧"


@dataclass
class Inspection:
    path: str
    format: str
    read: int
    valid: int
    problems: list[Problem]
    lengths: list[int]
    unit: str  # "tokens" or "characters"
    truncated_share: float
    samples: list[str]


def inspect_source(path: str, fmt: str, template: str, max_len: int, tokenizer=None,
                   task_sets: list[str] = (), n_samples: int = 3) -> Inspection:
    """Read and measure one source; tokenizer=None measures characters instead of tokens.
    Preference pairs ({prompt, chosen, rejected} and the other pair shapes) are recognised."""
    if fmt == "auto":
        rows, bad = read_raw_rows(path)
        if rows and sum(is_pair_row(r.data) for r in rows[:200]) * 2 > min(len(rows), 200):
            return inspect_pairs(path, rows, bad, template, max_len, tokenizer, task_sets, n_samples)
    result = read_source(path, fmt)
    examples, duplicates = drop_duplicates(result.examples)
    problems = result.problems + duplicates + find_contamination(examples, build_eval_index(list(task_sets)))
    if tokenizer is not None:
        prefix = special_prefix(tokenizer)
        encoded = [encode_segments(render_segments(e.messages, template, tokenizer), tokenizer, prefix)
                   for e in examples]
        lengths = [len(e.input_ids) for e in encoded]
        samples = [mark_masked(e.input_ids, e.labels, tokenizer) for e in encoded[:n_samples]]
        unit = "tokens"
    else:
        lengths = [sum(len(s.text) for s in render_segments(e.messages, template)) for e in examples]
        samples = [mark_masked_text(e, template) for e in examples[:n_samples]]
        unit = "characters"
    over = sum(1 for n in lengths if n > max_len)
    return Inspection(path, result.format, result.rows_read, len(examples), problems, lengths, unit,
                      over / len(lengths) if lengths else 0.0, samples)


def inspect_pairs(path: str, rows: list, problems: list[Problem], template: str, max_len: int, tokenizer,
                  task_sets: list[str], n_samples: int) -> Inspection:
    """Pairs: validation problems, the length of each side (prompt + response), and samples showing
    the masked prompt with the chosen and the rejected response."""
    problems = list(problems)
    pairs = [p for p in (row_to_pair(row, problems) for row in rows) if p is not None]
    problems += find_contamination([p.as_example() for p in pairs], build_eval_index(list(task_sets)))
    lengths, samples = [], []
    for i, pair in enumerate(pairs):
        sides = []
        for key in ("chosen", "rejected"):
            messages = pair.prompt + [{"role": "assistant", "content": getattr(pair, key)}]
            if tokenizer is not None:
                encoded = encode_response(pair.prompt, getattr(pair, key), template, tokenizer,
                                          special_prefix(tokenizer))
                lengths.append(len(encoded.input_ids))
                sides.append(f"[{key}] " + mark_masked(encoded.input_ids, encoded.labels, tokenizer))
            else:
                lengths.append(sum(len(s.text) for s in render_segments(messages, template)))
                sides.append(f"[{key}] " + mark_masked_text(Example(messages, pair.origin), template))
        if i < n_samples:
            samples.append("\n".join(sides))
    over = sum(1 for n in lengths if n > max_len)
    return Inspection(path, "pairs", len(rows) + sum(1 for p in problems if p.kind in ("json", "encoding")),
                      len(pairs), problems, lengths, "tokens" if tokenizer is not None else "characters",
                      over / len(lengths) if lengths else 0.0, samples)


def mark_masked(input_ids: list[int], labels: list[int], tokenizer) -> str:
    """Decode an example with its loss-masked spans wrapped in ⟦ ⟧."""
    out, run, masked = [], [], None
    for token, label in zip(input_ids, labels):
        is_masked = label == IGNORE
        if masked is not None and is_masked != masked:
            out.append(wrap(tokenizer.decode(run), masked))
            run = []
        run.append(token)
        masked = is_masked
    if run:
        out.append(wrap(tokenizer.decode(run), masked))
    return "".join(out)


def mark_masked_text(example: Example, template: str) -> str:
    return "".join(wrap(s.text, not s.is_answer) + ("<EOS>" if s.add_eos else "")
                   for s in render_segments(example.messages, template))


def wrap(text: str, masked: bool) -> str:
    return f"{MASK_OPEN}{text}{MASK_CLOSE}" if masked else text


def histogram(values: list[int], bins: int = 10, width: int = 40) -> list[str]:
    """A text histogram: one line per bin with its range, count and a bar."""
    if not values:
        return ["(no values)"]
    low, high = min(values), max(values)
    step = max(1, -(-(high - low + 1) // bins))
    counts = [0] * bins
    for v in values:
        counts[min((v - low) // step, bins - 1)] += 1
    top = max(counts)
    lines = []
    for i, count in enumerate(counts):
        start = low + i * step
        if start > high:
            break
        bar = "█" * round(width * count / top) if top else ""
        lines.append(f"{start:>6}–{start + step - 1:<6} {count:>6} {bar}")
    return lines


def percentile(sorted_values: list[int], q: float) -> int:
    """Nearest-rank percentile: the smallest value with at least q% of the values at or below it."""
    return sorted_values[max(0, math.ceil(len(sorted_values) * q / 100) - 1)]


def format_inspection(report: Inspection, max_len: int) -> str:
    lines = [f"== {report.path}", f"format: {report.format}",
             f"records: {report.read} read, {report.valid} valid, {len(report.problems)} with problems"]
    for problem in report.problems[:20]:
        lines.append(f"  ! {problem}")
    if len(report.problems) > 20:
        lines.append(f"  ! ... and {len(report.problems) - 20} more")
    if report.lengths:
        v = sorted(report.lengths)
        lines.append(f"length in {report.unit}: min {v[0]}, mean {statistics.mean(v):.1f}, "
                     f"median {statistics.median(v):g}, p95 {percentile(v, 95)}, max {v[-1]}")
        lines.append(f"over max_seq_length {max_len}: {report.truncated_share:.1%}")
        lines += histogram(report.lengths)
    lines.append(f"examples ({MASK_OPEN}…{MASK_CLOSE} = prompt, no loss; the rest is learned):")
    for i, sample in enumerate(report.samples, start=1):
        lines.append(f"--- example {i}")
        lines.append(sample)
    return "\n".join(lines)
