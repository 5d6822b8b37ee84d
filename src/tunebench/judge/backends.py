"""Judge backends: anything that turns a prompt into a reply.

`BACKEND:MODEL` names one:
- `openai:MODEL` — any OpenAI-compatible endpoint through the official `openai` client (OpenAI,
  vLLM, Ollama, llama.cpp server, `tunebench serve`, Gemini's OpenAI endpoint); judge.base_url and
  judge.api_key_env (default OPENAI_API_KEY) configure it;
- `gemini:MODEL` — Google Gemini through `google-genai` when installed (GEMINI_API_KEY), else
  through Gemini's OpenAI-compatible endpoint;
- `local:RUN_OR_MODEL` — a transformers model in this process.

Keys are read from the environment at call time and never logged or stored. Failures worth a
retry (429, 5xx, timeouts, lost connections) raise TransientError; a blocked or empty reply raises
EmptyReply; anything else (a bad key, an unknown model) is a JudgeError that stops the run.
"""

from __future__ import annotations

import os
import threading
from typing import Protocol

from tunebench.config import JudgeConfig
from tunebench.errors import JudgeError

GEMINI_OPENAI_URL = "https://generativelanguage.googleapis.com/v1beta/openai/"


class TransientError(Exception):
    """Worth retrying after a pause; retry_after is the server's hint in seconds, if any."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class EmptyReply(Exception):
    """The judge answered with no text (e.g. a safety block); retried, then recorded unscored."""


class JudgeBackend(Protocol):
    name: str
    endpoint: str  # where requests go (a base URL); judgments are cached per endpoint

    def complete(self, prompt: str, temperature: float) -> str: ...


def parse_judge_spec(spec: str) -> tuple[str, str]:
    if ":" not in spec:
        raise JudgeError(f"judge '{spec}': expected BACKEND:MODEL, e.g. openai:gpt-4o-mini, "
                         "gemini:gemini-2.5-flash, local:runs/my-run")
    kind, model = spec.split(":", 1)
    if kind not in ("openai", "gemini", "local") or not model:
        raise JudgeError(f"judge '{spec}': backend must be openai, gemini or local, followed by a model name")
    return kind, model


def make_backend(config: JudgeConfig) -> JudgeBackend:
    kind, model = parse_judge_spec(config.judge or "")
    if kind == "openai":
        return OpenAIBackend(model, config.base_url, config.api_key_env or "OPENAI_API_KEY", config.timeout_s)
    if kind == "gemini":
        try:
            import google.genai  # noqa: F401
        except ImportError:
            return OpenAIBackend(model, config.base_url or GEMINI_OPENAI_URL, config.api_key_env or "GEMINI_API_KEY",
                                 config.timeout_s, label="gemini")
        return GeminiBackend(model, config.api_key_env or "GEMINI_API_KEY", config.timeout_s)
    return LocalBackend(model)


def read_key(env_name: str, required: bool) -> str:
    key = os.environ.get(env_name, "")
    if not key and required:
        raise JudgeError(f"no API key: set the environment variable {env_name} (or judge.api_key_env to another name)")
    return key or "none"


class OpenAIBackend:
    def __init__(self, model: str, base_url: str | None, key_env: str, timeout_s: float, label: str = "openai"):
        from openai import OpenAI

        self.name = f"{label}:{model}"
        self.model = model
        # A local server (vLLM, Ollama, tunebench serve) needs no key; the real APIs do.
        key = read_key(key_env, required=base_url is None or "googleapis.com" in (base_url or ""))
        self.client = OpenAI(api_key=key, base_url=base_url, timeout=timeout_s, max_retries=0)
        self.endpoint = str(self.client.base_url)  # part of the cache key: another server, another judgment

    def complete(self, prompt: str, temperature: float) -> str:
        import openai

        try:
            reply = self.client.chat.completions.create(
                model=self.model, messages=[{"role": "user", "content": prompt}], temperature=temperature)
        except openai.RateLimitError as exc:
            raise TransientError(f"429 rate limited: {exc.message}", retry_after_of(exc)) from exc
        except openai.APIStatusError as exc:
            if exc.status_code >= 500 or exc.status_code == 408:
                raise TransientError(f"{exc.status_code}: {exc.message}", retry_after_of(exc)) from exc
            raise JudgeError(f"judge {self.name} refused the request ({exc.status_code}): {exc.message}") from exc
        except (openai.APITimeoutError, openai.APIConnectionError) as exc:
            raise TransientError(f"{type(exc).__name__}: {exc}") from exc
        choice = reply.choices[0] if reply.choices else None
        text = choice.message.content if choice and choice.message else None
        if not text or not text.strip():
            reason = choice.finish_reason if choice else "no choices"
            raise EmptyReply(f"empty reply (finish_reason {reason})")
        return text


def retry_after_of(exc) -> float | None:
    try:
        value = exc.response.headers.get("retry-after")
        return float(value) if value is not None else None
    except (AttributeError, ValueError):
        return None


class GeminiBackend:
    def __init__(self, model: str, key_env: str, timeout_s: float):
        from google import genai

        self.name = f"gemini:{model}"
        self.model = model
        self.endpoint = "google-genai"
        self.client = genai.Client(api_key=read_key(key_env, required=True),
                                   http_options={"timeout": int(timeout_s * 1000)})

    def complete(self, prompt: str, temperature: float) -> str:
        from google.genai import errors, types

        try:
            reply = self.client.models.generate_content(
                model=self.model, contents=prompt, config=types.GenerateContentConfig(temperature=temperature))
        except errors.APIError as exc:
            if exc.code in (408, 429) or (exc.code or 0) >= 500:
                raise TransientError(f"{exc.code}: {exc.message}") from exc
            raise JudgeError(f"judge {self.name} refused the request ({exc.code}): {exc.message}") from exc
        text = reply.text if reply.candidates else None
        if not text or not text.strip():
            feedback = getattr(reply, "prompt_feedback", None)
            reason = getattr(feedback, "block_reason", None) or (
                reply.candidates[0].finish_reason if reply.candidates else "no candidates")
            raise EmptyReply(f"empty reply from Gemini (blocked or stopped: {reason})")
        return text


class LocalBackend:
    """A transformers model in this process (a run, a merged model, or a hub id/folder)."""

    def __init__(self, target: str):
        from tunebench.config import GenerateConfig
        from tunebench.generate.engine import Generator
        from tunebench.models.trained import load_for_inference

        self.name = f"local:{target}"
        self.endpoint = "local"
        loaded = load_for_inference(target)
        # A run judges with its own template; a plain model with its chat template, else the course one.
        template = loaded.template or ("chat" if getattr(loaded.tokenizer, "chat_template", None) else "course")
        self.generator = Generator(loaded.model, loaded.tokenizer, template,
                                   GenerateConfig(max_new_tokens=256, batch_size=1, repetition_penalty=1.0))
        self.lock = threading.Lock()

    def complete(self, prompt: str, temperature: float) -> str:

        generator = self.generator.with_settings(do_sample=temperature > 0,
                                                 temperature=temperature if temperature > 0 else 1.0)
        with self.lock:
            answer = generator.generate_batch([generator.encode([{"role": "user", "content": prompt}])])[0]
        if not answer.text:
            raise EmptyReply("the local judge produced no text")
        return answer.text
