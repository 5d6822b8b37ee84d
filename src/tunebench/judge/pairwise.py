"""Pairwise judging: which of two answers to the same task is better, asked in both orders.

LLM judges favour the answer shown first (GPT-4 kept its verdict on swapped pairs only ~65% of
the time in the MT-Bench paper, Zheng et al. 2023). So every pair is judged twice, A/B and B/A, and
a side wins only when both orders agree; any disagreement is a tie. How often the two orders agree
is the judge's position consistency. Judgments go through JudgeRunner, so they are cached (by judge,
prompt hash, both answers' hashes and the order), resumable, retried, and an unparsable or blocked
reply is stored unscored and never counted.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from tunebench.config import JudgeConfig
from tunebench.errors import ConfigError
from tunebench.judge.backends import JudgeBackend
from tunebench.judge.language import fails_gate, japanese_share
from tunebench.judge.length import length_controlled, length_stats
from tunebench.judge.rubric import PROMPTS, fill_slots, text_hash
from tunebench.judge.runner import Item, JudgeRunner
from tunebench.judge.stats import bootstrap_ci

ORDERS = ("AB", "BA")  # AB: run A's answer shown first
VERDICT = re.compile(r"(?:判定|勝者|verdict|winner)\s*[:：=]\s*[\*\[「『\s]*(A|B|引き分け|引分け|同等|tie|draw)",
                     re.IGNORECASE)
BRACKETED = re.compile(r"\[\[\s*(A|B|C)\s*\]\]")  # MT-Bench's [[A]] / [[B]] / [[C]] (tie)
BARE_LAST_LINE = re.compile(r"^\s*\**\s*(A|B|引き分け)\s*\**\s*$")
OUTCOME = {"B": 1.0, "tie": 0.5, "A": 0.0}  # B's score: the candidate against the baseline


def parse_verdict(reply: str | None) -> str | None:
    """'A' (first shown), 'B' (second shown), 'tie', or None when the reply names no verdict."""
    if not reply or not reply.strip():
        return None
    text = unicodedata.normalize("NFKC", reply)
    labelled = VERDICT.findall(text)
    found = labelled[-1] if labelled else None  # the final verdict comes last
    if found is None:
        bracketed = BRACKETED.findall(text)
        found = bracketed[-1] if bracketed else None
    if found is None:
        lines = [line for line in text.strip().splitlines() if line.strip()]
        match = BARE_LAST_LINE.match(lines[-1]) if lines else None
        found = match.group(1) if match else None
    if found is None:
        return None
    return found.upper() if found.upper() in ("A", "B") else "tie"


def verdict_reason(reply: str) -> str:
    """The judge's reasoning: the reply without its final verdict line."""
    lines = reply.strip().splitlines()
    if lines and parse_verdict(lines[-1]) is not None:
        lines = lines[:-1]
    return "\n".join(lines).strip()


def load_pairwise_prompt(prompt_file: str | None, has_reference: bool) -> str:
    if prompt_file:
        try:
            text = Path(prompt_file).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"judge.pairwise_prompt_file {prompt_file}: not found") from None
        missing = [s for s in ("{input}", "{answer_a}", "{answer_b}") if s not in text]
        if missing:
            raise ConfigError(f"{prompt_file}: a pairwise prompt needs the slots {', '.join(missing)}")
        return text
    name = "elyza_pairwise.txt" if has_reference else "elyza_pairwise_reference_free.txt"
    return (PROMPTS / name).read_text(encoding="utf-8")


@dataclass(frozen=True)
class Pair:
    """Two answers to one task: run A's (the baseline) and run B's (the candidate)."""

    task_id: object
    input: str
    a: str
    b: str
    reference: str | None = None
    eval_aspect: str | None = None


@dataclass(frozen=True)
class ShownPair(Item):
    """One pair in one order; `output` is the answer shown first, `second` the one shown second."""

    second: str = ""
    order: str = "AB"


def shown(pair: Pair, order: str) -> ShownPair:
    first, second = (pair.a, pair.b) if order == "AB" else (pair.b, pair.a)
    return ShownPair((pair.task_id, order), pair.input, first, pair.reference, pair.eval_aspect, second, order)


class PairwiseRunner(JudgeRunner):
    """JudgeRunner over ShownPairs: same cache, retries and rate limit; a verdict instead of a score."""

    unparsable = "no parsable verdict (判定: A, B or 引き分け) in the reply"

    def answer_hash(self, item: ShownPair) -> str:
        return text_hash(item.input, item.output, item.second, item.reference, item.eval_aspect, item.order)

    def prompt_for(self, item: ShownPair) -> str:
        return fill_slots(self.rubric, {"{input}": item.input, "{answer_a}": item.output, "{answer_b}": item.second,
                                        "{reference}": item.reference or "(なし)",
                                        "{eval_aspect}": item.eval_aspect or "(なし)"})

    def parse(self, raw: str) -> str | None:
        return parse_verdict(raw)

    def reason(self, raw: str) -> str:
        return verdict_reason(raw)


def preferred_run(verdict: str | None, order: str) -> str | None:
    """Map a verdict on the shown positions back to the runs: 'A', 'B', 'tie' or None."""
    if verdict in (None, "tie"):
        return verdict
    first_run, second_run = ("A", "B") if order == "AB" else ("B", "A")
    return first_run if verdict == "A" else second_run


def combine_orders(ab: str | None, ba: str | None) -> tuple[str | None, bool | None]:
    """(winner, position consistent): a run wins only when both orders name it; None if either is unscored."""
    if ab is None or ba is None:
        return None, None
    return (ab if ab == ba else "tie"), ab == ba


def gate_decision(pair: Pair, config: JudgeConfig) -> str | None:
    """In strict language-gate mode a task where exactly one answer fails the gate is decided
    without a judge call: the Japanese answer wins."""
    if not (config.language_gate and config.language_gate_strict):
        return None
    a_fails, b_fails = (fails_gate(t, config.language_threshold) for t in (pair.a, pair.b))
    return {(True, False): "B", (False, True): "A"}.get((a_fails, b_fails))


def judge_pairs(pairs: list[Pair], config: JudgeConfig, backend: JudgeBackend, cache_path: Path,
                progress: bool = True) -> list[dict]:
    """Per-task verdicts of one judge: both orders, combined."""
    has_reference = all(p.reference for p in pairs)
    runner = PairwiseRunner(backend, load_pairwise_prompt(config.pairwise_prompt_file, has_reference), cache_path,
                            samples=1, temperature=config.temperature, concurrency=config.concurrency,
                            requests_per_minute=config.requests_per_minute, max_retries=config.max_retries,
                            backoff_s=config.backoff_s)
    decided = {p.task_id: gate_decision(p, config) for p in pairs}
    items = [shown(p, order) for p in pairs if decided[p.task_id] is None for order in ORDERS]
    judgments = runner.judge_all(items, progress)
    rows = []
    for pair in pairs:
        row = {"task_id": pair.task_id, "winner": decided[pair.task_id], "consistent": None, "orders": {},
               "reasons": {}, "errors": {}, "gated": decided[pair.task_id] is not None}
        if not row["gated"]:
            for order in ORDERS:
                record = judgments[(pair.task_id, order)][0]
                row["orders"][order] = preferred_run(record["score"], order)
                row["reasons"][order] = record["reason"]
                if record["error"]:
                    row["errors"][order] = record["error"]
                    if record["raw"]:  # what the judge said instead of a verdict, for the report
                        row.setdefault("unparsed", {})[order] = record["raw"][:300]
            row["winner"], row["consistent"] = combine_orders(row["orders"]["AB"], row["orders"]["BA"])
        rows.append(row)
    return rows


def summarize(pairs: list[Pair], rows: list[dict], judge: str, prompt_hash: str | None = None) -> dict:
    """Win/tie/loss of B against A, win rate with a seeded bootstrap CI, position consistency, length control."""
    scored = [(p, r) for p, r in zip(pairs, rows) if r["winner"] is not None]
    outcomes = [OUTCOME[r["winner"]] for _, r in scored]
    judged = [r for _, r in scored if r["consistent"] is not None]
    low, high = bootstrap_ci(outcomes)
    return {"judge": judge, "prompt_hash": prompt_hash, "tasks": len(pairs), "scored": len(scored),
            "unscored": len(pairs) - len(scored),
            "wins": sum(1 for o in outcomes if o == 1.0), "ties": sum(1 for o in outcomes if o == 0.5),
            "losses": sum(1 for o in outcomes if o == 0.0),
            "win_rate": sum(outcomes) / len(outcomes) if outcomes else None, "ci_low": low, "ci_high": high,
            "position_consistency": sum(r["consistent"] for r in judged) / len(judged) if judged else None,
            "gated": sum(1 for r in rows if r["gated"]),
            "length_control": length_controlled([len(p.b) - len(p.a) for p, _ in scored], outcomes)}


def answer_facts(pairs: list[Pair], threshold: float) -> dict:
    """Length statistics and language flags of both sides, for the report."""
    facts = {}
    for side in ("a", "b"):
        texts = [getattr(p, side) for p in pairs]
        shares = {p.task_id: japanese_share(getattr(p, side)) for p in pairs}
        facts[side] = {"lengths": length_stats(texts),
                       "language_flagged": [t for t, s in shares.items() if s < threshold], "japanese_share": shares}
    return facts
