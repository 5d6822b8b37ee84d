import json
import threading
import time

import pytest

from tunebench.config import GenerateConfig
from tunebench.generate.engine import Generator
from tunebench.generate.serve import Limits, make_server
from tunebench.models.trained import load_for_inference


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    loaded = load_for_inference(str(tiny_model_dir))
    generator = Generator(loaded.model, loaded.tokenizer, "course",
                          GenerateConfig(max_new_tokens=6, batch_size=1, repetition_penalty=1.0, no_repeat_ngram_size=1))
    srv = make_server(generator, "tiny", port=0, limits=Limits(max_tokens=64, max_prompt_tokens=200))
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv, generator
    srv.shutdown()
    srv.server_close()


def client(srv):
    from openai import OpenAI

    return OpenAI(base_url=f"http://127.0.0.1:{srv.server_address[1]}/v1", api_key="unused", max_retries=0)


def test_openai_client_lists_models_and_chats(server):
    srv, generator = server
    api = client(srv)
    assert [m.id for m in api.models.list().data] == ["tiny"]
    reply = api.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "日本の首都は？"}])
    expected = generator.generate([[{"role": "user", "content": "日本の首都は？"}]])[0]
    assert reply.choices[0].message.content == expected.text and expected.text
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 6
    assert reply.usage.prompt_tokens == len(generator.encode([{"role": "user", "content": "日本の首都は？"}]))


def test_streaming_and_max_tokens(server):
    srv, _ = server
    stream = client(srv).chat.completions.create(model="tiny", stream=True, max_tokens=3,
                                                 messages=[{"role": "user", "content": "こんにちは"}])
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text and chunks[-1].choices[0].finish_reason == "length"


def test_stream_sends_the_answer_in_several_chunks_equal_to_the_whole(server):
    srv, _ = server
    api = client(srv)
    messages = [{"role": "user", "content": "日本の首都はどこですか？"}]
    whole = api.chat.completions.create(model="tiny", max_tokens=12, messages=messages).choices[0].message.content
    chunks = list(api.chat.completions.create(model="tiny", stream=True, max_tokens=12, messages=messages))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices[0].delta.content]
    assert len(pieces) >= 3 and "".join(pieces) == whole  # token by token, not one chunk at the end


def test_bad_request_is_a_400_with_a_message(server):
    import openai

    srv, _ = server
    with pytest.raises(openai.BadRequestError, match="last message must have role 'user'"):
        client(srv).chat.completions.create(model="tiny", messages=[{"role": "assistant", "content": "x"}])


def post(srv, body: bytes, headers=None):
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", srv.server_address[1], timeout=30)
    conn.request("POST", "/v1/chat/completions", body=body,
                 headers={"Content-Type": "application/json", **(headers or {})})
    response = conn.getresponse()
    status, payload = response.status, response.read()
    conn.close()
    return status, json.loads(payload)


MESSAGES = '"messages": [{"role": "user", "content": "こんにちは"}]'


@pytest.mark.parametrize("body, message", [
    ("[]", "the request body must be a JSON object, got list"),
    ("null", "the request body must be a JSON object, got NoneType"),
    ('"hello"', "the request body must be a JSON object, got str"),
    ("{not json", "the request body is not valid JSON"),
    ("{" + MESSAGES + ', "max_tokens": Infinity}', "'max_tokens' must be an integer, got Infinity"),
    ("{" + MESSAGES + ', "max_tokens": 100000}', "'max_tokens' must be in [1, 64], got 100000"),
    ("{" + MESSAGES + ', "max_tokens": 0}', "'max_tokens' must be in [1, 64], got 0"),
    ("{" + MESSAGES + ', "max_tokens": true}', "'max_tokens' must be an integer, got true"),
    ("{" + MESSAGES + ', "stop": [1, 2]}', "'stop' must be a string or a list of up to 4 non-empty strings, got [1, 2]"),
    ("{" + MESSAGES + ', "temperature": -1}', "'temperature' must be in [0, 2], got -1"),
    ("{" + MESSAGES + ', "top_p": 5}', "'top_p' must be in (0, 1], got 5"),
    ("{" + MESSAGES + ', "stream": "yes"}', "'stream' must be true or false"),
    ('{"messages": [{"role": "user", "content": 5}]}', "message 'content' must be a string or a list of text parts"),
    ('{"messages": [{"role": "wizard", "content": "x"}]}', "message 'role' must be one of system, user, assistant"),
])
def test_bad_bodies_get_a_400_with_a_json_error(server, body, message):
    srv, _ = server
    status, payload = post(srv, body.encode())
    assert status == 400 and message in payload["error"]["message"]
    assert payload["error"]["type"] == "invalid_request_error"


def test_over_long_prompts_are_refused(server):
    srv, _ = server
    status, payload = post(srv, json.dumps({"messages": [{"role": "user", "content": "あ" * 2000}]}).encode())
    assert status == 400 and "this server accepts at most 200" in payload["error"]["message"]
    status, payload = post(srv, b"{" + b" " * (1 << 20) + b"}")
    assert status == 413 and "over the 1048576 byte limit" in payload["error"]["message"]


def test_max_tokens_beyond_the_context_is_refused(tiny_model_dir):
    loaded = load_for_inference(str(tiny_model_dir))
    generator = Generator(loaded.model, loaded.tokenizer, "course",
                          GenerateConfig(max_new_tokens=600, batch_size=1, stop=[], repetition_penalty=1.0))
    srv = make_server(generator, "tiny", port=0, limits=Limits(max_tokens=5000, max_prompt_tokens=5000))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        status, payload = post(srv, ('{' + MESSAGES + ', "max_tokens": 2000}').encode())
        assert status == 400 and "exceeds the model's context of 1024" in payload["error"]["message"]
        n = 200
        while len(generator.encode([{"role": "user", "content": " ".join(f"語{i}" for i in range(n))}])) < 1000:
            n += 1
        messages = [{"role": "user", "content": " ".join(f"語{i}" for i in range(n))}]
        assert len(generator.encode(messages)) < 1020  # room for a few new tokens, not for the default 600
        status, payload = post(srv, json.dumps({"messages": messages}).encode())  # no max_tokens: the default shrinks
        assert status == 200 and payload["usage"]["total_tokens"] <= 1024
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.fixture()
def slow_server(tiny_model_dir):
    """A server whose model takes 20 ms per token, so an abandoned request would hold it for seconds."""
    loaded = load_for_inference(str(tiny_model_dir))
    loaded.model.register_forward_pre_hook(lambda *args: time.sleep(0.02))
    generator = Generator(loaded.model, loaded.tokenizer, "course",
                          GenerateConfig(max_new_tokens=6, batch_size=1, stop=[], repetition_penalty=1.0))
    srv = make_server(generator, "tiny", port=0, limits=Limits(max_tokens=600, max_prompt_tokens=200))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.mark.parametrize("stream", [False, True])
def test_generation_stops_when_the_client_goes_away(slow_server, caplog, stream):
    import logging
    import socket

    caplog.set_level(logging.INFO, logger="tunebench.generate.serve")
    body = json.dumps({"messages": [{"role": "user", "content": "長い話をして"}], "max_tokens": 600,
                       "stream": stream}).encode()
    sock = socket.create_connection(("127.0.0.1", slow_server.server_address[1]))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    time.sleep(0.5)
    sock.close()  # the client gives up: 600 tokens would take 12 s
    start = time.monotonic()
    status, payload = post(slow_server, ('{' + MESSAGES + ', "max_tokens": 2}').encode())
    assert status == 200 and payload["usage"]["completion_tokens"] <= 2
    assert time.monotonic() - start < 4  # the next chat did not wait for the abandoned one
    stopped = [r.getMessage() for r in caplog.records if "stopped after" in r.getMessage() or "ended early" in r.getMessage()]
    assert stopped, "the abandoned generation was not stopped"


def test_ctrl_c_stops_serve_without_a_resume_hint(tiny_model_dir, monkeypatch, capsys):
    from tunebench.cli import main
    from tunebench.generate.serve import ChatServer

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ChatServer, "serve_forever", interrupted)
    assert main(["serve", str(tiny_model_dir), "--template", "course", "--port", "0"]) == 0
    err = capsys.readouterr().err
    assert "server stopped" in err and "resume" not in err
