"""Judge many answers: concurrency, a requests-per-minute cap, retries with backoff, and a cache.

Every judgment is appended to a JSONL keyed by judge, endpoint, prompt hash, answer hash and sample
index, so a rerun pays for nothing twice, an interrupted run resumes, and a changed prompt, answer or
endpoint is re-judged alone. A reply with no parsable score is retried, then stored unscored with its
text; only scored records are final: a rerun asks again for the unscored ones (an outage, timeouts or
unparsable replies do not leave a task unscored for good). Records written before the endpoint was
part of the key are misses (judged again once), since which server gave them is unknown.
Ctrl-C cancels the queued requests, waits only for the ones already sent, and returns what finished.
"""

from __future__ import annotations

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
from tunebench.runs import append_jsonl, read_jsonl

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

    def wait(self, stop: threading.Event) -> None:
        if not self.interval:
            return
        with self.lock:
            now = time.monotonic()
            start = max(now, self.next_start)
            self.next_start = start + self.interval
        stop.wait(max(0.0, start - now))  # Ctrl-C ends the wait


def cache_key(judge: str, endpoint: str, prompt_hash: str, answer_hash: str, sample: int) -> str:
    return text_hash(judge, endpoint, prompt_hash, answer_hash, str(sample))


def load_cache(path: Path) -> dict[str, dict]:
    # a line cut by a crash is skipped (judged again), and cut away before the next append
    return {record["key"]: record for record in read_jsonl(path)}


class JudgeRunner:
    def __init__(self, backend: JudgeBackend, rubric: str, cache_path: Path, *, samples: int = 1,
                 temperature: float = 0.0, concurrency: int = 4, requests_per_minute: int | None = None,
                 max_retries: int = 5, backoff_s: float = 1.0, max_wait_s: float = 60.0):
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
        self.max_wait_s = max_wait_s
        self.endpoint = getattr(backend, "endpoint", "")
        self.write_lock = threading.Lock()
        self.stopping = threading.Event()  # set on Ctrl-C: no new attempts, no more pauses
        self.interrupted = False

    def judge_all(self, items: list[Item], progress: bool = True) -> dict[object, list[dict]]:
        """Judgments per task_id (one per sample), from the cache or the backend.

        After Ctrl-C the result holds what finished and `self.interrupted` is True."""
        self.stopping.clear()
        self.interrupted = False
        cache = load_cache(self.cache_path)
        jobs, results = [], {item.task_id: [] for item in items}
        for item in items:
            answer_hash = self.answer_hash(item)
            for sample in range(self.samples):
                key = cache_key(self.backend.name, self.endpoint, self.prompt_hash, answer_hash, sample)
                if key in cache and cache[key].get("score") is not None:
                    results[item.task_id].append(cache[key])
                else:  # never judged, or unscored last time (an outage, a timeout): ask again
                    jobs.append((item, sample, key, answer_hash))
        if jobs:
            self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            bar = tqdm(total=len(jobs), desc=f"judge {self.backend.name}", unit="call", disable=not progress)
            pool = ThreadPoolExecutor(self.concurrency)
            futures = [pool.submit(self.judge_one, *job) for job in jobs]
            collected = set()
            try:
                for future in as_completed(futures):
                    collected.add(future)
                    record = future.result()  # a JudgeError stops the run; finished records are saved
                    if record is not None:
                        results[record["task_id"]].append(record)
                    bar.update(1)
            except KeyboardInterrupt:
                self.interrupted = True
                self.stopping.set()
                log.warning("interrupted: cancelling %d queued judgment(s), waiting for the ones already sent",
                            sum(not f.done() for f in futures))
            finally:
                self.stopping.set()
                # Queued requests are never sent (the pool's own exit would send them all).
                pool.shutdown(wait=True, cancel_futures=True)
                bar.close()
            for future in futures:  # requests in flight at the interrupt finished meanwhile
                if future not in collected and future.done() and not future.cancelled() and not future.exception():
                    record = future.result()
                    if record is not None:
                        results[record["task_id"]].append(record)
        for records in results.values():
            records.sort(key=lambda r: r["sample"])
        return results

    def judge_one(self, item: Item, sample: int, key: str, answer_hash: str) -> dict | None:
        """One judgment, recorded in the cache; None when cancelled by Ctrl-C before any reply."""
        prompt = self.prompt_for(item)
        raw, error, score = None, None, None
        for attempt in range(self.max_retries + 1):
            self.limiter.wait(self.stopping)
            if self.stopping.is_set():
                if attempt == 0:
                    return None
                break
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
                  "endpoint": self.endpoint, "prompt_hash": self.prompt_hash, "answer_hash": answer_hash, "score": score,
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
        # Exponential backoff with full jitter; a server's Retry-After wins when it asks for longer,
        # up to judge.max_wait_s (a server asking for an hour would otherwise stall the run silently).
        delay = self.backoff_s * (2 ** attempt) * (0.5 + random.random() / 2)
        self.stopping.wait(min(self.max_wait_s, max(delay, retry_after or 0.0)))
