"""`tunebench serve`: an OpenAI-compatible HTTP server over a run or model.

Endpoints: GET /v1/models, POST /v1/chat/completions (stream=true answers in server-sent-event
format, as one content chunk once the answer is complete). Binds 127.0.0.1 by default. Prompts are
rendered with the run's own template, so chatting matches training; it also makes any local model
a judge backend for `tunebench judge`.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tunebench.generate.engine import Generator

log = logging.getLogger(__name__)


class ChatServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, generator: Generator, model_name: str):
        super().__init__(address, ChatHandler)
        self.generator = generator
        self.model_name = model_name
        self.lock = threading.Lock()  # one generation at a time on the model

    def complete(self, body: dict) -> tuple[str, str, int, int]:
        """Answer a chat request: (text, finish_reason, prompt_tokens, completion_tokens)."""
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise ValueError("'messages' must be a non-empty list of {role, content}")
        messages = [{"role": m.get("role"), "content": content_text(m.get("content"))} for m in messages]
        if messages[-1]["role"] != "user":
            raise ValueError("the last message must have role 'user'")
        config = self.generator.config
        temperature = body.get("temperature")
        changes = {"max_new_tokens": int(body.get("max_completion_tokens") or body.get("max_tokens")
                                         or config.max_new_tokens)}
        if temperature is not None:
            changes.update(do_sample=float(temperature) > 0, temperature=float(temperature) or 1.0)
        if body.get("top_p") is not None:
            changes["top_p"] = float(body["top_p"])
        stop = body.get("stop")
        if stop:
            changes["stop"] = self.generator.stops + ([stop] if isinstance(stop, str) else list(stop))
        generator = self.generator.with_settings(**changes)
        prompt = generator.encode(messages)
        with self.lock:
            answer = generator.generate_batch([prompt])[0]
        return answer.text, "stop" if answer.stopped else "length", len(prompt), answer.new_tokens


def content_text(content) -> str:
    """OpenAI content may be a string or a list of {type: text, text} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    raise ValueError("message 'content' must be a string or a list of text parts")


class ChatHandler(BaseHTTPRequestHandler):
    server: ChatServer

    def log_message(self, format, *args):  # noqa: A002 - http.server's signature
        log.debug("%s %s", self.address_string(), format % args)

    def send_json(self, status: int, payload: dict) -> None:
        body = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def send_error_json(self, status: int, message: str) -> None:
        self.send_json(status, {"error": {"message": message, "type": "invalid_request_error", "code": status}})

    def do_GET(self):  # noqa: N802 - http.server's naming
        if self.path.rstrip("/") == "/v1/models":
            self.send_json(200, {"object": "list", "data": [
                {"id": self.server.model_name, "object": "model", "created": 0, "owned_by": "tunebench"}]})
        else:
            self.send_error_json(404, f"no route {self.path}")

    def do_POST(self):  # noqa: N802
        if self.path.rstrip("/") != "/v1/chat/completions":
            self.send_error_json(404, f"no route {self.path}")
            return
        try:
            length = int(self.headers.get("Content-Length", 0))
            body = json.loads(self.rfile.read(length) or b"{}")
            text, finish, n_prompt, n_new = self.server.complete(body)
        except (ValueError, TypeError) as exc:
            self.send_error_json(400, str(exc))
            return
        ident, created, model = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time()), self.server.model_name
        usage = {"prompt_tokens": n_prompt, "completion_tokens": n_new, "total_tokens": n_prompt + n_new}
        if not body.get("stream"):
            self.send_json(200, {"id": ident, "object": "chat.completion", "created": created, "model": model,
                                 "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                              "finish_reason": finish}], "usage": usage})
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        base = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model}
        for delta, reason in (({"role": "assistant", "content": text}, None), ({}, finish)):
            chunk = {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": reason}]}
            self.wfile.write(f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n".encode("utf-8"))
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()


def make_server(generator: Generator, model_name: str, host: str = "127.0.0.1", port: int = 8000) -> ChatServer:
    return ChatServer((host, port), generator, model_name)
