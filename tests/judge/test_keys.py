"""API keys go only where they belong: real HTTP on 127.0.0.1 records the Authorization header."""

import json
import logging

import pytest

from tunebench.cli import main
from tunebench.config import JudgeConfig
from tunebench.errors import JudgeError

from .fake_openai import FakeJudge, Handler

SECRET = "hf_USERS_OWN_TOKEN_0123456789"


class RecordingHandler(Handler):
    def do_POST(self):  # noqa: N802
        self.server.authorizations.append(self.headers.get("Authorization"))
        super().do_POST()


@pytest.fixture()
def server():
    fake = FakeJudge()
    fake.authorizations = []
    fake.RequestHandlerClass = RecordingHandler  # read per request; none has arrived yet
    yield fake
    fake.stop()


@pytest.fixture()
def shared_run(tmp_path, server, monkeypatch):
    """A run folder someone else made: its config.yaml points the judge at their server and names HF_TOKEN."""
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "TUNEBENCH_JUDGE_BASE_URL", "GEMINI_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.setenv("OPENAI_API_KEY", SECRET + "-openai")
    run = tmp_path / "copied-run"
    run.mkdir()
    (run / "config.yaml").write_text(
        f"judge:\n  judge: openai:fake\n  base_url: {server.url}\n  api_key_env: HF_TOKEN\n  backoff_s: 0.01\n",
        encoding="utf-8")
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text(json.dumps({"task_id": 0, "input": "質問"}, ensure_ascii=False) + "\n", encoding="utf-8")
    (run / "predictions.jsonl").write_text(
        json.dumps({"task_id": 0, "input": "質問", "output": "WANT:4 答え"}, ensure_ascii=False) + "\n",
        encoding="utf-8")
    return run, tasks


def sent_secrets(server):
    return [a for a in server.authorizations if a and SECRET in a]


def test_a_copied_run_config_gets_no_key(shared_run, server, caplog):
    run, tasks = shared_run
    caplog.set_level(logging.INFO)
    assert main(["judge", str(run), "--tasks", str(tasks)]) == 0
    assert server.authorizations and not sent_secrets(server)  # judged, without the user's token
    assert "not sending HF_TOKEN" in caplog.text
    assert SECRET not in caplog.text


@pytest.mark.parametrize("how", ["--base-url", "OPENAI_BASE_URL"])
def test_a_url_the_user_names_gets_the_key_and_the_log_says_so(shared_run, server, caplog, monkeypatch, how):
    run, tasks = shared_run
    caplog.set_level(logging.INFO)
    extra = ["--base-url", server.url] if how == "--base-url" else []
    if how == "OPENAI_BASE_URL":
        monkeypatch.setenv("OPENAI_BASE_URL", server.url)
    assert main(["judge", str(run), "--tasks", str(tasks), *extra]) == 0
    assert server.authorizations and all(a == f"Bearer {SECRET}" for a in server.authorizations)
    assert "sending the key in HF_TOKEN to 127.0.0.1" in caplog.text
    assert SECRET not in caplog.text


def test_openai_key_is_not_sent_to_a_url_only_a_config_names(shared_run, server):
    run, tasks = shared_run
    text = (run / "config.yaml").read_text().replace("  api_key_env: HF_TOKEN\n", "")
    (run / "config.yaml").write_text(text)
    assert main(["judge", str(run), "--tasks", str(tasks)]) == 0
    assert server.authorizations and not sent_secrets(server)


def test_a_config_cannot_send_another_variable_to_a_provider(monkeypatch):
    from tunebench.judge.backends import make_backend

    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(JudgeError, match="not sending HF_TOKEN"):
        make_backend(JudgeConfig(judge="openai:gpt-4o-mini", api_key_env="HF_TOKEN"))
    # named on the command line, the same variable may go to the provider
    make_backend(JudgeConfig(judge="openai:gpt-4o-mini", api_key_env="HF_TOKEN"), user_key_env=True)


def test_never_over_plain_http_to_another_machine(monkeypatch):
    from tunebench.judge.backends import key_refusal

    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    url = "http://judge.example.com/v1"
    assert "plain http" in key_refusal("OPENAI_API_KEY", url, (url,), True)
    assert "plain http" in key_refusal("OPENAI_API_KEY", "http://10.1.2.3:8000/v1", ("http://10.1.2.3:8000/v1",), True)
    assert key_refusal("OPENAI_API_KEY", "http://127.0.0.1:8000/v1", ("http://127.0.0.1:8000/v1",), False) is None
    assert key_refusal("OPENAI_API_KEY", "https://api.openai.com/v1", (), False) is None
    assert key_refusal("GEMINI_API_KEY", "https://api.openai.com/v1", (), False) is not None
    assert key_refusal("OPENAI_API_KEY", "https://judge.example.com/v1", (), False) is not None
