"""A scripted OpenAI-compatible chat server on 127.0.0.1 for judge tests.

The behaviour of each request is chosen by a marker in the answer being judged:
CASE:429 / CASE:500 / CASE:SLOW fail on the first attempt, CASE:NOSCORE never gives a score,
CASE:EMPTY answers with empty text once, CASE:401 refuses, CASE:WAIT answers 429 with
'Retry-After: 30' once, CASE:INTERRUPT raises KeyboardInterrupt in the main thread (as Ctrl-C
does) before answering; anything else gets '評価: N' where N is the digit after 'WANT:' in the
answer (default 3). While `down` is True every request gets a 500 (an outage).

Pairwise judges are chosen by the model name (the CASE markers still apply): `pair-first` always
prefers the answer shown first, `pair-longer` the longer one, `pair-good` the answer holding
'GOOD' (a tie when both or neither do).
"""

from __future__ import annotations

import _thread
import json
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeJudge(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.hits = Counter()
        self.down = False
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def total(self) -> int:
        return sum(self.hits.values())

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


class Handler(BaseHTTPRequestHandler):
    server: FakeJudge

    def log_message(self, *args):
        pass

    def reply(self, status, payload, headers=()):
        body = json.dumps(payload, ensure_ascii=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        for key, value in headers:
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][-1]["content"]
        case = re.search(r"CASE:(\w+)", prompt)
        case = case.group(1) if case else "OK"
        with self.server.lock:
            self.server.hits[prompt] += 1
            attempt = self.server.hits[prompt]
        if self.server.down:
            return self.reply(500, {"error": {"message": "outage", "type": "server"}})
        if case == "INTERRUPT":
            _thread.interrupt_main()
        if case == "WAIT" and attempt == 1:
            return self.reply(429, {"error": {"message": "come back later", "type": "rate_limit"}}, [("Retry-After", "30")])
        if case == "401":
            return self.reply(401, {"error": {"message": "invalid api key", "type": "auth"}})
        if case == "429" and attempt == 1:
            return self.reply(429, {"error": {"message": "slow down", "type": "rate_limit"}}, [("Retry-After", "0.05")])
        if case == "500" and attempt == 1:
            return self.reply(500, {"error": {"message": "boom", "type": "server"}})
        if case == "SLOW" and attempt == 1:
            time.sleep(1.5)
        want = re.search(r"WANT:(\d)", prompt)
        text = f"回答は質問に沿っています。\n評価: {want.group(1) if want else 3}"
        if body["model"].startswith("pair-"):
            text = pairwise_reply(body["model"], prompt)
        if case == "NOSCORE":
            text = "よくできていますが、点数はつけません。"
        if case == "EMPTY" and attempt == 1:
            text = ""
        self.reply(200, {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                         "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                      "finish_reason": "stop" if text else "content_filter"}],
                         "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})


def shown_answers(prompt: str) -> tuple[str, str]:
    """The two answers in a pairwise prompt (judge/prompts/elyza_pairwise*.txt)."""
    first = prompt.split("# 回答A\n", 1)[1].split("\n\n# 回答B\n", 1)[0]
    second = prompt.split("# 回答B\n", 1)[1].rsplit("\n\nまず", 1)[0]
    return first, second


def pairwise_reply(model: str, prompt: str) -> str:
    first, second = shown_answers(prompt)
    if model == "pair-first":
        verdict = "A"
    elif model == "pair-longer":
        verdict = "A" if len(first) > len(second) else "B" if len(second) > len(first) else "引き分け"
    else:
        verdict = {(True, False): "A", (False, True): "B"}.get(("GOOD" in first, "GOOD" in second), "引き分け")
    return f"回答を比べました。\n判定: {verdict}"


def write_tasks_and_predictions(tmp_path, outputs):
    """A task file of len(outputs) tasks and run/predictions.jsonl answering each with its output."""
    tasks = tmp_path / "tasks.jsonl"
    preds = tmp_path / "run" / "predictions.jsonl"
    preds.parent.mkdir()
    tasks.write_text("".join(json.dumps({"task_id": i, "input": f"質問{i}"}, ensure_ascii=False) + "\n"
                             for i in range(len(outputs))), encoding="utf-8")
    preds.write_text("".join(json.dumps({"task_id": i, "input": f"質問{i}", "output": o}, ensure_ascii=False) + "\n"
                             for i, o in enumerate(outputs)), encoding="utf-8")
    return tasks, preds
