"""The data stage: read sources → validate → de-duplicate → guard → mix → render → tokenise → pack.

Writes `data/train.jsonl`, `data/eval.jsonl` and `data/summary.json` into the run directory.
Nothing is dropped silently: every skipped record is a Problem, counted in the summary.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tunebench.config import Config, DataConfig, SourceConfig
from tunebench.data.batches import pack_examples
from tunebench.data.contamination import build_eval_index, find_contamination
from tunebench.data.dedup import drop_duplicates
from tunebench.data.readers import read_source
from tunebench.data.records import Example, Problem
from tunebench.data.templates import render_segments
from tunebench.data.tokens import Encoded, encode_segments, fit_length, special_prefix
from tunebench.errors import DataError
from tunebench.runs import DATA_SUMMARY, RunDir, write_json_atomic

log = logging.getLogger(__name__)


@dataclass
class Summary:
    read: int = 0
    kept: int = 0  # training examples (a source weight of 2 counts each of its records twice)
    records_kept: int | None = None  # distinct records behind them: read = records_kept + dropped + left_out
    # (None in a summary.json written before this count existed)
    left_out: int = 0  # valid records not sampled (source weight below 1, data.max_records)
    truncated: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    formats: dict[str, str] = field(default_factory=dict)
    train_rows: int = 0
    eval_rows: int = 0
    train_tokens: int = 0
    answer_tokens: int = 0
    fingerprint: str = ""

    def lines(self) -> list[str]:
        why = ", ".join(f"{n} {k}" for k, n in sorted(self.dropped.items())) or "none"
        records = self.kept if self.records_kept is None else self.records_kept
        examples = f" ({self.kept} training examples after source weights)" if self.kept != records else ""
        left_out = (f"; {self.left_out} left out by a source weight below 1 or data.max_records"
                    if self.left_out else "")
        return [
            f"read {self.read} records; kept {records}{examples}; dropped {sum(self.dropped.values())} "
            f"({why}){left_out}; truncated {self.truncated}",
            f"rows: {self.train_rows} train, {self.eval_rows} eval; {self.train_tokens} train tokens, "
            f"{self.answer_tokens} with loss",
        ]


def collect_examples(data: DataConfig, strict: bool, allow_contamination: bool
                     ) -> tuple[list[Example], list[Problem], dict[str, str], int]:
    """Read and validate every source; returns kept examples, problems, formats and rows read."""
    if not data.sources:
        raise DataError("data.sources is empty: add at least one source, e.g. "
                        "--set 'data.sources=[{path: builtin:ja-instruct-megagon}]'")
    examples: list[Example] = []
    problems: list[Problem] = []
    formats: dict[str, str] = {}
    read = 0
    per_source: list[tuple[SourceConfig, list[Example]]] = []
    for source in data.sources:
        result = read_source(source.path, source.format, source.split)
        formats[source.path] = result.format
        read += result.rows_read
        problems += result.problems
        per_source.append((source, result.examples))
    everything = [e for _, group in per_source for e in group]
    unique, dup_problems = drop_duplicates(everything)
    problems += dup_problems
    guard_contamination(unique, data, allow_contamination)
    if strict and problems:
        raise DataError(f"{len(problems)} bad record(s) (--strict):\n  " + "\n  ".join(map(str, problems[:20]))
                        + ("\n  ..." if len(problems) > 20 else ""))
    for problem in problems:
        log.warning("skipped %s", problem)
    keep = {id(e) for e in unique}
    rng = random.Random(data.seed)
    for source, group in per_source:
        group = [e for e in group if id(e) in keep]
        examples += mix_weight(group, source.weight, rng)
    rng.shuffle(examples)
    if data.max_records is not None:
        examples = examples[: data.max_records]
    return examples, problems, formats, read


def guard_contamination(examples: list[Example], data: DataConfig, allow_contamination: bool) -> None:
    """Refuse training records (or pair prompts) whose user text overlaps evaluation inputs."""
    contaminated = find_contamination(examples, build_eval_index(data.contamination_sets))
    if contaminated and not (allow_contamination or data.allow_contamination):
        raise DataError(
            f"{len(contaminated)} training record(s) overlap evaluation data:\n  "
            + "\n  ".join(map(str, contaminated[:10]))
            + "\nremove them, or pass --allow-contamination if you know what you are doing"
        )
    for problem in contaminated:
        log.warning("kept despite overlap (--allow-contamination): %s", problem)


def mix_weight(group: list[Example], weight: float, rng: random.Random) -> list[Example]:
    """Repeat a source floor(weight) times and add a random share for the fraction."""
    whole, fraction = int(weight), weight - int(weight)
    return group * whole + rng.sample(group, round(len(group) * fraction))


def encode_examples(examples: list[Example], data: DataConfig, tokenizer
                    ) -> tuple[list[Encoded], list[Problem], int]:
    """Render and tokenise; apply the overlength policy. Returns encodings, drops, truncations.

    A record repeated by its source weight is encoded once and, when too long, dropped once (so
    the summary's counts add up to the records read)."""
    prefix = special_prefix(tokenizer)
    encoded, problems, truncated = [], [], 0
    done: dict[int, Encoded | None] = {}
    for example in examples:
        if id(example) not in done:
            full = encode_segments(render_segments(example.messages, data.template, tokenizer), tokenizer, prefix)
            done[id(example)] = fit_length(full, data.max_seq_length, data.overlength)
            if done[id(example)] is None:
                problems.append(Problem(example.origin, None, f"{len(full.input_ids)} tokens > max_seq_length "
                                        f"{data.max_seq_length} (data.overlength=drop)", "length"))
                log.warning("skipped %s", problems[-1])
        fitted = done[id(example)]
        if fitted is None:
            continue
        truncated += fitted.truncated
        encoded.append(fitted)
    return encoded, problems, truncated


def fingerprint(config: Config, tokenizer_name: str) -> str:
    """A hash of what the prepared tokens depend on: data settings, source files and tokenizer."""
    h = hashlib.sha256(json.dumps(asdict(config.data), sort_keys=True).encode())
    h.update(tokenizer_name.encode())
    for source in config.data.sources:
        path = Path(source.path)
        if path.is_file():
            h.update(hashlib.sha256(path.read_bytes()).digest())
        else:
            h.update(source.path.encode())
    return h.hexdigest()[:16]


def prepare(config: Config, run: RunDir, tokenizer, tokenizer_name: str, strict: bool = False,
            allow_contamination: bool = False) -> Summary:
    """Run the data stage and write its outputs (skipped when already done for the same inputs)."""
    data = config.data
    fp = fingerprint(config, tokenizer_name)
    summary_path = run.data_dir / DATA_SUMMARY
    if summary_path.exists():
        previous = json.loads(summary_path.read_text(encoding="utf-8"))
        if previous.get("fingerprint") == fp:
            return Summary(**previous)
    examples, problems, formats, read = collect_examples(data, strict, allow_contamination)
    encoded, length_problems, truncated = encode_examples(examples, data, tokenizer)
    if strict and length_problems:
        raise DataError("examples longer than max_seq_length (--strict, overlength=drop):\n  "
                        + "\n  ".join(map(str, length_problems[:20])))
    dropped = Counter(p.kind for p in problems + length_problems)
    if not encoded:
        why = ", ".join(f"{n} {k}" for k, n in sorted(dropped.items())) or "none dropped"
        raise DataError(f"no training examples left: read {read} record(s) from data.sources ({why}); "
                        + ("the sources hold no records" if not read else
                           "each dropped record is named in the warnings above" if dropped else
                           "data.max_records or the source weights left none"))
    n_eval = int(len(encoded) * data.eval_fraction)
    eval_set, train_set = encoded[:n_eval], encoded[n_eval:]
    train_rows = (pack_examples(train_set, data.max_seq_length) if data.packing
                  else [{"input_ids": e.input_ids, "labels": e.labels} for e in train_set])
    eval_rows = [{"input_ids": e.input_ids, "labels": e.labels} for e in eval_set]
    run.data_dir.mkdir(parents=True, exist_ok=True)
    write_rows(run.data_dir / "train.jsonl", train_rows)
    write_rows(run.data_dir / "eval.jsonl", eval_rows)
    records_kept = len({id(e) for e in examples}) - len(length_problems)
    summary = Summary(
        read=read, kept=len(encoded), records_kept=records_kept,
        left_out=max(0, read - records_kept - sum(dropped.values())), truncated=truncated, dropped=dict(dropped), formats=formats,
        train_rows=len(train_rows), eval_rows=len(eval_rows),
        train_tokens=sum(len(r["input_ids"]) for r in train_rows),
        answer_tokens=sum(sum(1 for x in r["labels"] if x != -100) for r in train_rows),
        fingerprint=fp,
    )
    write_json_atomic(summary_path, asdict(summary))  # written last: marks the stage complete
    return summary


def write_rows(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    tmp.replace(path)


def read_token_rows(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def collect_pairs(data: DataConfig, allow_contamination: bool) -> tuple[list, list[Problem], dict[str, str], int]:
    """Read and validate every pair source; returns pairs (mixed and shuffled), problems, formats, rows read."""
    from tunebench.data.pairs import row_to_pair
    from tunebench.data.readers import read_raw_rows

    if not data.sources:
        raise DataError("data.sources is empty: add a file of preference pairs {prompt, chosen, rejected}")
    rng = random.Random(data.seed)
    pairs, problems, formats, read = [], [], {}, 0
    for source in data.sources:
        rows, bad = read_raw_rows(source.path, source.split)
        problems += bad
        read += len(rows) + len(bad)
        formats[source.path] = "pairs"
        group = [p for p in (row_to_pair(row, problems) for row in rows) if p is not None]
        pairs += mix_weight(group, source.weight, rng)
    guard_contamination([p.as_example() for p in pairs], data, allow_contamination)
    for problem in problems:
        log.warning("skipped %s", problem)
    rng.shuffle(pairs)
    return pairs[: data.max_records] if data.max_records is not None else pairs, problems, formats, read


def prepare_pairs(config: Config, run: RunDir, tokenizer, tokenizer_name: str, allow_contamination: bool = False
                  ) -> Summary:
    """The data stage for preference objectives: data/train.jsonl holds one pair of encodings a line."""
    from tunebench.data.pairs import encode_pair

    data = config.data
    fp = fingerprint(config, tokenizer_name + ":pairs")
    summary_path = run.data_dir / DATA_SUMMARY
    if summary_path.exists() and json.loads(summary_path.read_text(encoding="utf-8")).get("fingerprint") == fp:
        return Summary(**json.loads(summary_path.read_text(encoding="utf-8")))
    pairs, problems, formats, read = collect_pairs(data, allow_contamination)
    prefix = special_prefix(tokenizer)
    rows, dropped = [], Counter(p.kind for p in problems)
    for pair in pairs:
        row = encode_pair(pair, data.template, tokenizer, prefix, data.max_seq_length, data.overlength)
        if row is None:
            dropped["length"] += 1
            log.warning("skipped %s: longer than max_seq_length %d", pair.origin, data.max_seq_length)
        else:
            rows.append(row)
    if not rows:
        raise DataError("no preference pairs left after validation; see the warnings above")
    run.data_dir.mkdir(parents=True, exist_ok=True)
    write_rows(run.data_dir / "train.jsonl", rows)
    write_rows(run.data_dir / "eval.jsonl", [])
    summary = Summary(read=read, kept=len(rows), dropped=dict(dropped), formats=formats, train_rows=len(rows),
                      train_tokens=sum(len(r[k]["input_ids"]) for r in rows for k in ("chosen", "rejected")),
                      answer_tokens=sum(sum(1 for x in r[k]["labels"] if x != -100) for r in rows
                                        for k in ("chosen", "rejected")), fingerprint=fp)
    write_json_atomic(summary_path, asdict(summary))  # written last: marks the stage complete
    return summary
