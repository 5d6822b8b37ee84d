import threading

import pytest

from tunebench.config import GenerateConfig
from tunebench.generate.engine import Generator
from tunebench.generate.serve import make_server
from tunebench.models.trained import load_for_inference


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    loaded = load_for_inference(str(tiny_model_dir))
    generator = Generator(loaded.model, loaded.tokenizer, "course",
                          GenerateConfig(max_new_tokens=6, batch_size=1, repetition_penalty=1.0, no_repeat_ngram_size=1))
    srv = make_server(generator, "tiny", port=0)
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


def test_bad_request_is_a_400_with_a_message(server):
    import openai

    srv, _ = server
    with pytest.raises(openai.BadRequestError, match="last message must have role 'user'"):
        client(srv).chat.completions.create(model="tiny", messages=[{"role": "assistant", "content": "x"}])
