"""Fixtures of the judge tests: a scripted OpenAI-compatible judge, and `tunebench serve` of the tiny
model as a judge, both on 127.0.0.1."""

import threading

import pytest

from .fake_openai import FakeJudge


@pytest.fixture()
def fake():
    server = FakeJudge()
    yield server
    server.stop()


@pytest.fixture()
def tiny_judge_url(tiny_model_dir):
    """`tunebench serve` of the tiny random model (as model "tiny"): its OpenAI-compatible base URL."""
    from tunebench.config import GenerateConfig
    from tunebench.generate.engine import Generator
    from tunebench.generate.serve import make_server
    from tunebench.models.trained import load_for_inference

    loaded = load_for_inference(str(tiny_model_dir))
    generator = Generator(loaded.model, loaded.tokenizer, "course",
                          GenerateConfig(max_new_tokens=8, batch_size=1, repetition_penalty=1.0, no_repeat_ngram_size=1))
    server = make_server(generator, "tiny", port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()
