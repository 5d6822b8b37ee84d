"""`tunebench serve`: an OpenAI-compatible HTTP server over a run or model.

Endpoints: GET /v1/models, POST /v1/chat/completions (stream=true sends the answer in server-sent
events as it is generated). Binds 127.0.0.1 by default. Prompts are rendered with the run's own
template, so chatting matches training; it also makes any local model a judge backend for
`tunebench judge`.

One model answers one request at a time, so one request must not hold it for long: a request is
refused (400, or 413 for a body over 1 MiB, with an OpenAI-style JSON error) when it is not a JSON
object, asks for more than `max_tokens` new tokens, has a prompt longer than `max_prompt_tokens` or
than the model's context allows, or carries an out-of-range setting (temperature outside 0–2,
top_p outside (0, 1], a non-string stop). Generation stops as soon as the client goes away.
"""

from __future__ import annotations

import json
import logging
import math
import queue
import select
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from tunebench.generate.engine import Generator

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 20  # a chat request is text: 1 MiB is far beyond any prompt the limits accept
DRAIN_BYTES = 16 << 20  # an oversized body is read away up to this much before the 413, then the socket closes
ROLES = ("system", "user", "assistant")


class RequestError(ValueError):
    """A request the server refuses; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Limits:
    max_tokens: int  # most new tokens one request may ask for
    max_prompt_tokens: int  # longest prompt (in tokens) accepted
    context: int | None = None  # the model's context window: prompt + new tokens must fit


@dataclass(frozen=True)
class ChatRequest:
    messages: list[dict[str, str]]
    changes: dict  # generate settings for this request (Generator.with_settings)
    stream: bool
    max_tokens_asked: bool = False  # False: the server's default, shortened to fit the context


def context_length(model) -> int | None:
    config = getattr(model.config, "text_config", None) or model.config
    return getattr(config, "max_position_embeddings", None)


def number(body: dict, key: str, low: float, high: float, *, integer: bool = False, low_open: bool = False):
    """body[key] as a finite number in [low, high] (or (low, high]); None when absent or null."""
    value = body.get(key)
    if value is None:
        return None
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or (
            integer and value != int(value)):
        raise RequestError(f"'{key}' must be {kind}, got {json.dumps(value)}")
    if value < low or value > high or (low_open and value == low):
        bracket = "(" if low_open else "["
        raise RequestError(f"'{key}' must be in {bracket}{low:g}, {high:g}], got {value:g}")
    return int(value) if integer else float(value)


def parse_chat_request(body, limits: Limits, default_max_tokens: int) -> ChatRequest:
    """Check a chat-completions body and turn it into generate settings; RequestError when it is bad."""
    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object, got {type(body).__name__}")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise RequestError("'messages' must be a non-empty list of {role, content}")
    for m in messages:
        if m.get("role") not in ROLES:
            raise RequestError(f"message 'role' must be one of {', '.join(ROLES)}, got {json.dumps(m.get('role'))}")
    messages = [{"role": m["role"], "content": content_text(m.get("content"))} for m in messages]
    if messages[-1]["role"] != "user":
        raise RequestError("the last message must have role 'user'")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = number(body, key, 1, limits.max_tokens, integer=True)
    changes: dict = {"max_new_tokens": max_tokens or min(default_max_tokens, limits.max_tokens)}
    temperature = number(body, "temperature", 0, 2)
    if temperature is not None:
        changes.update(do_sample=temperature > 0, temperature=temperature or 1.0)
    top_p = number(body, "top_p", 0, 1, low_open=True)
    if top_p is not None:
        changes["top_p"] = top_p
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
            raise RequestError(f"'stop' must be a string or a list of up to 4 non-empty strings, got {json.dumps(stop)}")
        changes["stop"] = stops
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise RequestError(f"'stream' must be true or false, got {json.dumps(stream)}")
    return ChatRequest(messages, changes, bool(stream), max_tokens is not None)


def content_text(content) -> str:
    """OpenAI content may be a string or a list of {type: text, text} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and isinstance(p.get("text", ""), str) for p in content):
        return "".join(p.get("text", "") for p in content)
    raise RequestError("message 'content' must be a string or a list of text parts")


def client_gone(sock: socket.socket) -> bool:
    """True when the peer closed the connection (readable with nothing to read)."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True


class StopWhen(StoppingCriteria):
    """Ends generation when `should_stop()` says so (the client left), checked after every token."""

    def __init__(self, should_stop):
        self.should_stop = should_stop
        self.fired = False

    def __call__(self, input_ids, scores, **kwargs):
        self.fired = self.fired or self.should_stop()
        return torch.full((input_ids.shape[0],), self.fired, dtype=torch.bool, device=input_ids.device)


class TokenQueue(BaseStreamer):
    """Hands each generated token id to the request's thread (the first put is the prompt: skipped)."""

    def __init__(self):
        self.tokens: queue.Queue = queue.Queue()
        self.prompt_seen = False

    def put(self, value):
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            self.tokens.put(token)

    def end(self):
        self.tokens.put(None)


def streamable_text(text: str, stops: list[str]) -> str:
    """The part of the text generated so far that the final answer will surely start with: cut at a
    stop string, holding back what may begin one, a half-decoded character and trailing spaces."""
    text = text.lstrip()
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    if cut >= 0:
        return text[:cut].rstrip()
    hold = max((len(s) - 1 for s in stops), default=0)
    for size in range(hold, 0, -1):
        if any(s.startswith(text[-size:]) for s in stops):
            text = text[:-size]
            break
    return text.rstrip().rstrip("\ufffd")


class ChatServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, generator: Generator, model_name: str, limits: Limits | None = None):
        super().__init__(address, ChatHandler)
        self.generator = generator
        self.model_name = model_name
        context = context_length(generator.model)
        default = limits or Limits(max_tokens=max(generator.config.max_new_tokens, 1024), max_prompt_tokens=4096)
        self.limits = Limits(default.max_tokens, default.max_prompt_tokens, context)
        self.lock = threading.Lock()  # one generation at a time on the model

    def prepare(self, body) -> tuple[ChatRequest, Generator, list[int]]:
        """Check the request and encode its prompt; RequestError when it is refused."""
        request = parse_chat_request(body, self.limits, self.generator.config.max_new_tokens)
        changes = dict(request.changes)
        if "stop" in changes:
            changes["stop"] = self.generator.stops + changes["stop"]
        generator = self.generator.with_settings(**changes)
        prompt = generator.encode(request.messages)
        if len(prompt) > self.limits.max_prompt_tokens:
            raise RequestError(f"the prompt is {len(prompt)} tokens; this server accepts at most "
                               f"{self.limits.max_prompt_tokens} (tunebench serve --max-prompt-tokens)")
        context = self.limits.context
        room = context - len(prompt) if context else None
        if room is not None and not request.max_tokens_asked and 0 < room < generator.config.max_new_tokens:
            generator = generator.with_settings(max_new_tokens=room)  # the default shrinks to fit
        if room is not None and len(prompt) + generator.config.max_new_tokens > context:
            raise RequestError(f"the prompt ({len(prompt)} tokens) plus max_tokens "
                               f"({generator.config.max_new_tokens}) exceeds the model's context of {context}")
        return request, generator, prompt

    def complete(self, generator: Generator, prompt: list[int], should_stop, streamer=None):
        """(answer, stopped early because the client left); one generation at a time."""
        stop_when = StopWhen(should_stop)
        with self.lock:
            if should_stop():  # the client left while it waited for the model
                if streamer is not None:
                    streamer.end()
                return None, True
            answer = generator.generate_batch([prompt], stopping_criteria=StoppingCriteriaList([stop_when]),
                                              streamer=streamer)[0]
        if stop_when.fired:
            log.info("client went away: stopped after %d token(s)", answer.new_tokens)
        return answer, stop_when.fired


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

    def read_body(self):
        try:
            length = int(self.headers.get("Content-Length", 0))
        except ValueError:
            raise RequestError("Content-Length must be an integer") from None
        if length > MAX_BODY_BYTES:
            self.close_connection = True  # the rest of the body must not be parsed as the next request
            self.discard(min(length, DRAIN_BYTES))
            raise RequestError(f"request body of {length} bytes is over the {MAX_BODY_BYTES} byte limit", 413)
        try:
            return json.loads(self.rfile.read(length) or b"{}")
        except (ValueError, UnicodeDecodeError) as exc:
            raise RequestError(f"the request body is not valid JSON ({exc})") from None

    def discard(self, length: int) -> None:
        """Read and drop an oversized body, so the client, still sending, gets the 413 and not a reset."""
        self.connection.settimeout(5.0)
        try:
            while length > 0:
                length -= len(self.rfile.read(min(length, 1 << 16)) or b"x" * length)
        except OSError:
            pass

    def do_POST(self):  # noqa: N802
        if self.path.rstrip("/") != "/v1/chat/completions":
            self.send_error_json(404, f"no route {self.path}")
            return
        try:
            request, generator, prompt = self.server.prepare(self.read_body())
        except RequestError as exc:
            self.send_error_json(exc.status, str(exc))
            return
        ident, created, model = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time()), self.server.model_name
        if request.stream:
            self.stream(generator, prompt, {"id": ident, "object": "chat.completion.chunk", "created": created,
                                            "model": model})
            return
        answer, gone = self.server.complete(generator, prompt, lambda: client_gone(self.connection))
        if gone:
            return
        usage = {"prompt_tokens": len(prompt), "completion_tokens": answer.new_tokens,
                 "total_tokens": len(prompt) + answer.new_tokens}
        self.send_json(200, {"id": ident, "object": "chat.completion", "created": created, "model": model,
                             "choices": [{"index": 0, "message": {"role": "assistant", "content": answer.text},
                                          "finish_reason": "stop" if answer.stopped else "length"}], "usage": usage})

    def stream(self, generator: Generator, prompt: list[int], base: dict) -> None:
        """Server-sent events: one chunk per piece of text as the model produces it."""
        gone = threading.Event()  # set when a write fails: the generation thread then stops
        tokens = TokenQueue()
        outcome: dict = {}

        def run():
            try:
                outcome["answer"], _ = self.server.complete(
                    generator, prompt, lambda: gone.is_set() or client_gone(self.connection), tokens)
            except Exception as exc:  # noqa: BLE001 - reported to the client below
                outcome["error"] = exc
                tokens.end()

        def send(delta: dict, reason: str | None = None) -> None:
            chunk = {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": reason}]}
            self.wfile.write(f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n".encode("utf-8"))
            self.wfile.flush()

        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        ids: list[int] = []
        sent = ""
        try:
            send({"role": "assistant", "content": ""})
            while (token := tokens.tokens.get()) is not None:
                ids.append(token)
                text = streamable_text(generator.tokenizer.decode(ids, skip_special_tokens=True), generator.stops)
                if text.startswith(sent) and len(text) > len(sent):
                    send({"content": text[len(sent):]})
                    sent = text
            worker.join()
            answer = outcome.get("answer")
            if answer is None:
                raise OSError(f"generation failed: {outcome.get('error')}")
            if answer.text.startswith(sent) and len(answer.text) > len(sent):
                send({"content": answer.text[len(sent):]})
            send({}, "stop" if answer.stopped else "length")
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except OSError as exc:  # BrokenPipe / ConnectionReset: the client left
            gone.set()
            log.info("stream ended early: %s", exc)
            worker.join()


def make_server(generator: Generator, model_name: str, host: str = "127.0.0.1", port: int = 8000,
                limits: Limits | None = None) -> ChatServer:
    return ChatServer((host, port), generator, model_name, limits)
