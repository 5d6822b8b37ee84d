"""`tunebench pairs make`: preference pairs from the user's own model.

--mode reference: chosen = the data's reference answer, rejected = the run's greedy answer (offline,
no judge); pairs whose two answers are equal after normalisation are dropped.
--mode judge: k sampled answers per prompt, each scored by the configured judge backend; chosen =
best, rejected = worst; ties and prompts with fewer than two scored answers are dropped.

Resumable like `generate`: every answer is appended to OUT.answers.jsonl as it is made and skipped
on a rerun; judge calls are cached in OUT.judgments.jsonl like `judge`. OUT itself is written at the
end, atomically, with a summary of what was made and dropped (and why).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

from tunebench.config import GenerateConfig, JudgeConfig
from tunebench.data.dedup import normalize_text
from tunebench.data.readers import read_source
from tunebench.errors import ConfigError, DataError
from tunebench.runs import append_jsonl, write_json_atomic

log = logging.getLogger(__name__)
MODES = ("reference", "judge")


@dataclass
class Prompt:
    key: str  # where it came from (file:line), stable across reruns
    messages: list[dict[str, str]]  # ends with a user turn
    reference: str  # the data's answer


@dataclass
class PairsSummary:
    prompts: int = 0
    answers_made: int = 0
    answers_reused: int = 0
    made: int = 0
    dropped: dict[str, int] = field(default_factory=dict)

    def line(self) -> str:
        why = ", ".join(f"{n} {k}" for k, n in sorted(self.dropped.items())) or "none"
        return (f"{self.made} pairs from {self.prompts} prompts ({self.answers_made} answers generated, "
                f"{self.answers_reused} reused); dropped {sum(self.dropped.values())} ({why})")


def read_prompts(path: str, fmt: str = "auto") -> list[Prompt]:
    """Instruction data (any SFT format): the conversation up to the last answer, and that answer."""
    result = read_source(path, fmt)
    for problem in result.problems:
        log.warning("skipped %s", problem)
    if not result.examples:
        raise DataError(f"{path}: no usable prompts (see the warnings above)")
    prompts = []
    for example in result.examples:
        last = max(i for i, m in enumerate(example.messages) if m["role"] == "assistant")
        prompts.append(Prompt(str(example.origin), example.messages[:last], example.messages[last]["content"]))
    return prompts


def read_answers(path: Path) -> dict[tuple[str, int], str]:
    """Answers of an earlier (interrupted) run, keyed by (prompt key, sample)."""
    done: dict[tuple[str, int], str] = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash: answered again
            done[(row["key"], row["sample"])] = row["text"]
    return done


def generate_missing(generator, prompts: list[Prompt], samples: int, answers_path: Path,
                     summary: PairsSummary) -> dict[tuple[str, int], str]:
    """Every (prompt, sample) answer: reused from answers_path or generated (batched) and appended."""
    done = read_answers(answers_path)
    todo = [(p, s) for p in prompts for s in range(samples) if (p.key, s) not in done]
    summary.answers_reused = len(prompts) * samples - len(todo)
    if todo:
        answers_path.parent.mkdir(parents=True, exist_ok=True)

        def save(answer):
            prompt, sample = todo[answer.index]
            append_jsonl(answers_path, {"key": prompt.key, "sample": sample, "text": answer.text})
            done[(prompt.key, sample)] = answer.text

        generator.generate([p.messages for p, _ in todo], save)
    summary.answers_made = len(todo)
    return done


def reference_pairs(prompts: list[Prompt], answers: dict, summary: PairsSummary) -> list[dict]:
    dropped: Counter = Counter()
    pairs = []
    for prompt in prompts:
        own = answers[(prompt.key, 0)]
        if not own.strip():
            dropped["empty answer"] += 1
        elif normalize_text(own) == normalize_text(prompt.reference):
            dropped["equal to the reference"] += 1
        else:
            pairs.append(pair_record(prompt, prompt.reference, own))
    summary.dropped = dict(dropped)
    return pairs


def judge_pairs(prompts: list[Prompt], answers: dict, samples: int, judge: JudgeConfig, cache: Path,
                summary: PairsSummary, backend=None) -> list[dict]:
    """Score every answer with the judge (cached), then best vs worst per prompt."""
    from tunebench.judge.backends import make_backend
    from tunebench.judge.rubric import load_rubric
    from tunebench.judge.runner import Item, JudgeRunner

    items = [Item(f"{p.key}#{s}", user_text(p), answers[(p.key, s)], p.reference or None)
             for p in prompts for s in range(samples) if answers[(p.key, s)].strip()]
    runner = JudgeRunner(backend or make_backend(judge), load_rubric(judge.prompt_file, True), cache,
                         samples=1, temperature=judge.temperature, concurrency=judge.concurrency,
                         requests_per_minute=judge.requests_per_minute, max_retries=judge.max_retries,
                         backoff_s=judge.backoff_s)
    scores = {item_id: records[0]["score"] for item_id, records in runner.judge_all(items).items()}
    dropped: Counter = Counter()
    pairs = []
    for prompt in prompts:
        scored = [(scores[f"{prompt.key}#{s}"], answers[(prompt.key, s)]) for s in range(samples)
                  if scores.get(f"{prompt.key}#{s}") is not None]
        if len(scored) < 2:
            dropped["fewer than two scored answers"] += 1
            continue
        best, worst = max(scored, key=lambda x: x[0]), min(scored, key=lambda x: x[0])
        if best[0] == worst[0] or normalize_text(best[1]) == normalize_text(worst[1]):
            dropped["tie"] += 1
            continue
        pairs.append({**pair_record(prompt, best[1], worst[1]), "scores": [best[0], worst[0]]})
    summary.dropped = dict(dropped)
    return pairs


def user_text(prompt: Prompt) -> str:
    return "\n".join(m["content"] for m in prompt.messages if m["role"] == "user")


def pair_record(prompt: Prompt, chosen: str, rejected: str) -> dict:
    """A pair in the shape `train.objective: dpo` reads: a string prompt, or messages for multi-turn."""
    single = len(prompt.messages) == 1
    return {"prompt": prompt.messages[0]["content"] if single else prompt.messages, "chosen": chosen,
            "rejected": rejected, "source": prompt.key}


def make_pairs(target: str, prompts_path: str, out: Path, mode: str, generate: GenerateConfig,
               judge: JudgeConfig, samples: int = 4, temperature: float = 1.0, fmt: str = "auto",
               limit: int | None = None, generator=None, backend=None) -> PairsSummary:
    """Build OUT (JSONL pairs) and OUT.summary.json; `generator`/`backend` replace the real ones in tests."""
    if mode not in MODES:
        raise ConfigError(f"--mode {mode}: choose from {', '.join(MODES)}")
    if mode == "judge" and not judge.judge and backend is None:
        raise ConfigError("--mode judge needs a judge: set judge.judge (e.g. --set judge.judge=openai:gpt-4o-mini)")
    if mode == "judge" and samples < 2:
        raise ConfigError("--mode judge needs --samples 2 or more (best and worst of k answers)")
    prompts = read_prompts(prompts_path, fmt)[:limit]
    k = 1 if mode == "reference" else samples
    settings = (replace(generate, do_sample=False, limit=None) if mode == "reference"
                else replace(generate, do_sample=True, temperature=temperature, limit=None))
    if generator is None:
        from tunebench.generate.answers import build_generator

        generator = build_generator(target, settings, None, None)
    summary = PairsSummary(prompts=len(prompts))
    answers = generate_missing(generator, prompts, k, out.with_name(out.name + ".answers.jsonl"), summary)
    pairs = (reference_pairs(prompts, answers, summary) if mode == "reference"
             else judge_pairs(prompts, answers, k, judge, out.with_name(out.name + ".judgments.jsonl"), summary,
                              backend))
    summary.made = len(pairs)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs), encoding="utf-8")
    tmp.replace(out)
    write_json_atomic(out.with_name(out.name + ".summary.json"), {"mode": mode, **summary.__dict__})
    return summary
