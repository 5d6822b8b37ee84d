"""Judge backends: anything that turns a prompt into a reply.

`BACKEND:MODEL` names one:
- `openai:MODEL` — any OpenAI-compatible endpoint through the official `openai` client (OpenAI,
  vLLM, Ollama, llama.cpp server, `tunebench serve`, Gemini's OpenAI endpoint); judge.base_url and
  judge.api_key_env (default OPENAI_API_KEY) configure it;
- `gemini:MODEL` — Google Gemini through `google-genai` when installed (GEMINI_API_KEY), else
  through Gemini's OpenAI-compatible endpoint;
- `local:RUN_OR_MODEL` — a transformers model in this process.

Keys are read from the environment at call time and never logged or stored. A key goes only where
it belongs (see `key_refusal`): to its own provider's host, or to a base URL the user named on the
command line or in their environment (OPENAI_BASE_URL, TUNEBENCH_JUDGE_BASE_URL) — never to a URL
that only a config file names (a shared config or a copied run folder is not the user's word), and
never over plain http to another machine. Which variable goes to which host is logged before the
first request. Failures worth a
retry (429, 5xx, timeouts, lost connections) raise TransientError; a blocked or empty reply raises
EmptyReply; anything else (a bad key, an unknown model) is a JudgeError that stops the run.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import threading
from typing import Protocol
from urllib.parse import urlsplit

from tunebench.config import JudgeConfig, public_url
from tunebench.errors import JudgeError

GEMINI_OPENAI_URL = "https://generativelanguage.googleapis.com/v1beta/openai/"
OPENAI_URL = "https://api.openai.com/v1"
# The host each provider's own key variable belongs to.
PROVIDER_HOSTS = {"OPENAI_API_KEY": "api.openai.com", "GEMINI_API_KEY": "generativelanguage.googleapis.com",
                  "GOOGLE_API_KEY": "generativelanguage.googleapis.com"}
# Environment variables in which the user names a judge endpoint themselves.
USER_URL_VARIABLES = ("OPENAI_BASE_URL", "TUNEBENCH_JUDGE_BASE_URL")
log = logging.getLogger(__name__)


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


def make_backend(config: JudgeConfig, user_urls: tuple[str, ...] = (), user_key_env: bool = False) -> JudgeBackend:
    """The backend `config.judge` names. user_urls: base URLs the user gave on the command line;
    user_key_env: judge.api_key_env was given on the command line (not only by a config file)."""
    kind, model = parse_judge_spec(config.judge or "")
    trust = (tuple(user_urls), user_key_env)
    if kind == "openai":
        url = config.base_url or os.environ.get("OPENAI_BASE_URL") or OPENAI_URL
        return OpenAIBackend(model, url, config.api_key_env or "OPENAI_API_KEY", config.timeout_s, trust=trust)
    if kind == "gemini":
        try:
            import google.genai  # noqa: F401
        except ImportError:
            return OpenAIBackend(model, config.base_url or GEMINI_OPENAI_URL, config.api_key_env or "GEMINI_API_KEY",
                                 config.timeout_s, label="gemini", trust=trust)
        return GeminiBackend(model, config.api_key_env or "GEMINI_API_KEY", config.timeout_s, trust=trust)
    return LocalBackend(model)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def same_url(a: str, b: str) -> bool:
    return a.strip().rstrip("/") == b.strip().rstrip("/")


def key_refusal(key_env: str, url: str, user_urls: tuple[str, ...], user_key_env: bool) -> str | None:
    """Why the key in `key_env` must not go to `url`, or None when it may.

    It may go to the host its provider owns (OPENAI_API_KEY to api.openai.com; a variable named on
    the command line to either provider), or to a URL the user named (user_urls, or the value of
    OPENAI_BASE_URL / TUNEBENCH_JUDGE_BASE_URL) — never over plain http to another machine.
    """
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.scheme != "https" and not is_loopback(host):
        return f"{url} is plain {parts.scheme or 'http'} to another machine: a key would travel unencrypted"
    if PROVIDER_HOSTS.get(key_env) == host or (user_key_env and host in PROVIDER_HOSTS.values()):
        return None
    named = list(user_urls) + [os.environ[v] for v in USER_URL_VARIABLES if os.environ.get(v)]
    if any(same_url(url, u) for u in named):
        return None
    return (f"{host or url} is not where {key_env} belongs and was not named by you (pass --base-url {url}, "
            "or set OPENAI_BASE_URL, to send it there)")


def read_key(env_name: str, url: str, required: bool, trust: tuple[tuple[str, ...], bool] = ((), False)) -> str:
    """The key for `url` from the environment, or "none" where it must not or cannot be sent."""
    host = urlsplit(url).hostname or url
    key = os.environ.get(env_name, "")
    refusal = key_refusal(env_name, url, *trust) if key else None
    if refusal and required:
        raise JudgeError(f"judge: not sending {env_name}: {refusal}")
    if refusal:
        log.warning("judge: not sending %s to %s: %s", env_name, host, refusal)
        return "none"
    if not key and required:
        raise JudgeError(f"no API key: set the environment variable {env_name} (or judge.api_key_env to another name)")
    if key:
        log.info("judge: sending the key in %s to %s", env_name, host)
    return key or "none"


class OpenAIBackend:
    def __init__(self, model: str, base_url: str, key_env: str, timeout_s: float, label: str = "openai",
                 trust: tuple[tuple[str, ...], bool] = ((), False)):
        from openai import OpenAI

        self.name = f"{label}:{model}"
        self.model = model
        # A local server (vLLM, Ollama, tunebench serve) needs no key; the real APIs do.
        key = read_key(key_env, base_url, required=urlsplit(base_url).hostname in PROVIDER_HOSTS.values(),
                       trust=trust)
        self.client = OpenAI(api_key=key, base_url=base_url, timeout=timeout_s, max_retries=0)
        self.endpoint = public_url(str(self.client.base_url))  # in the cache key (never its credentials)

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
    def __init__(self, model: str, key_env: str, timeout_s: float, trust: tuple[tuple[str, ...], bool] = ((), False)):
        from google import genai

        self.name = f"gemini:{model}"
        self.model = model
        self.endpoint = "google-genai"
        self.client = genai.Client(api_key=read_key(key_env, GEMINI_OPENAI_URL, required=True, trust=trust),
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
        from tunebench.models.trained import load_for_inference, pick_template

        self.name = f"local:{target}"
        self.endpoint = "local"
        loaded = load_for_inference(target)
        # the same rule as generate: a run's own template, else a plain model's chat template
        template = pick_template(loaded.template, None, loaded.tokenizer)
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
