"""Judge many answers: concurrency, a requests-per-minute cap, retries with backoff, and a cache.

Every judgment is appended to a JSONL keyed by judge, prompt hash, answer hash and sample index,
so a rerun pays for nothing twice, an interrupted run resumes, and a changed prompt or answer is
re-judged alone. A reply with no parsable score is retried, then stored unscored with its text.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from tunebench.judge.backends import EmptyReply, JudgeBackend, TransientError
from tunebench.judge.parse import parse_score, reason_of
from tunebench.judge.rubric import fill, text_hash
from tunebench.runs import append_jsonl

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Item:
    """One answer to judge."""

    task_id: object
    input: str
    output: str
    reference: str | None = None
    eval_aspect: str | None = None


class RateLimiter:
    """At most `per_minute` request starts per minute, spread evenly."""

    def __init__(self, per_minute: int | None):
        self.interval = 60.0 / per_minute if per_minute else 0.0
        self.next_start = 0.0
        self.lock = threading.Lock()

    def wait(self) -> None:
        if not self.interval:
            return
        with self.lock:
            now = time.monotonic()
            start = max(now, self.next_start)
            self.next_start = start + self.interval
        time.sleep(max(0.0, start - now))


def cache_key(judge: str, prompt_hash: str, answer_hash: str, sample: int) -> str:
    return text_hash(judge, prompt_hash, answer_hash, str(sample))


def load_cache(path: Path) -> dict[str, dict]:
    cache: dict[str, dict] = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash: judged again
            cache[record["key"]] = record
    return cache


class JudgeRunner:
    def __init__(self, backend: JudgeBackend, rubric: str, cache_path: Path, *, samples: int = 1,
                 temperature: float = 0.0, concurrency: int = 4, requests_per_minute: int | None = None,
                 max_retries: int = 5, backoff_s: float = 1.0):
        self.backend = backend
        self.rubric = rubric
        self.prompt_hash = text_hash(rubric)
        self.cache_path = cache_path
        self.samples = samples
        self.temperature = temperature
        self.concurrency = max(1, concurrency)
        self.limiter = RateLimiter(requests_per_minute)
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.write_lock = threading.Lock()

    def judge_all(self, items: list[Item], progress: bool = True) -> dict[object, list[dict]]:
        """Judgments per task_id (one per sample), from the cache or the backend."""
        cache = load_cache(self.cache_path)
        jobs, results = [], {item.task_id: [] for item in items}
        for item in items:
            answer_hash = self.answer_hash(item)
            for sample in range(self.samples):
                key = cache_key(self.backend.name, self.prompt_hash, answer_hash, sample)
                if key in cache:
                    results[item.task_id].append(cache[key])
                else:
                    jobs.append((item, sample, key, answer_hash))
        if jobs:
            self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            bar = tqdm(total=len(jobs), desc=f"judge {self.backend.name}", unit="call", disable=not progress)
            with ThreadPoolExecutor(self.concurrency) as pool:
                futures = [pool.submit(self.judge_one, *job) for job in jobs]
                for future in as_completed(futures):
                    record = future.result()  # a JudgeError stops the run; finished records are saved
                    results[record["task_id"]].append(record)
                    bar.update(1)
            bar.close()
        for records in results.values():
            records.sort(key=lambda r: r["sample"])
        return results

    def judge_one(self, item: Item, sample: int, key: str, answer_hash: str) -> dict:
        prompt = self.prompt_for(item)
        raw, error, score = None, None, None
        for attempt in range(self.max_retries + 1):
            self.limiter.wait()
            try:
                raw = self.backend.complete(prompt, self.temperature)
            except TransientError as exc:
                error = str(exc)
                self.pause(attempt, exc.retry_after)
                continue
            except EmptyReply as exc:
                error = str(exc)
                self.pause(attempt, None)
                continue
            score = self.parse(raw)
            if score is not None:
                error = None
                break
            error = self.unparsable
            self.pause(attempt, None)
        record = {"key": key, "task_id": item.task_id, "sample": sample, "judge": self.backend.name,
                  "prompt_hash": self.prompt_hash, "answer_hash": answer_hash, "score": score,
                  "reason": self.reason(raw) if raw and score is not None else None, "raw": raw, "error": error}
        if score is None:
            log.warning("task %s sample %d unscored after %d attempt(s): %s", item.task_id, sample,
                        self.max_retries + 1, error)
        with self.write_lock:
            append_jsonl(self.cache_path, record)
        return record

    # What is judged and how a reply is read; pairwise judging (judge/pairwise.py) overrides these four.
    unparsable = "no parsable 1-5 score in the reply"

    def answer_hash(self, item: Item) -> str:
        return text_hash(item.input, item.output, item.reference, item.eval_aspect)

    def prompt_for(self, item: Item) -> str:
        return fill(self.rubric, item.input, item.output, item.reference, item.eval_aspect)

    def parse(self, raw: str):
        return parse_score(raw)

    def reason(self, raw: str) -> str:
        return reason_of(raw)

    def pause(self, attempt: int, retry_after: float | None) -> None:
        if attempt >= self.max_retries:
            return
        # Exponential backoff with full jitter; a server's Retry-After wins when it asks for longer.
        delay = self.backoff_s * (2 ** attempt) * (0.5 + random.random() / 2)
        time.sleep(min(60.0, max(delay, retry_after or 0.0)))
