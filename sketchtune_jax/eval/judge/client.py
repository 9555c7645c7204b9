"""A client for an OpenAI-compatible chat-completions endpoint, with retries and backoff.

Any server that speaks ``POST {base}/chat/completions`` works: OpenAI, Azure's OpenAI-compatible
route, vLLM, SGLang, llama.cpp's server, Ollama, LiteLLM or OpenRouter. Throttling (HTTP 429),
server errors (5xx), timeouts and dropped connections are retried with exponential backoff
(``Retry-After`` honoured); a refused key or a request the server rejects (other 4xx) is not,
since asking again cannot change the answer.
"""

from __future__ import annotations

import dataclasses
import json
import random
import threading
from typing import Any

import httpx2 as httpx


class JudgeError(ValueError):
    """The judge cannot be used as set up (unreachable, key refused, request rejected); the message
    says what to change. A `ValueError`, so the command line prints it as one line."""


class JudgeUnavailable(RuntimeError):
    """The judge kept failing (throttled, server errors, timeouts) after every retry: a failure
    while running, not a setting to change; asking again later may succeed."""


@dataclasses.dataclass(frozen=True)
class JudgeReply:
    """One answer of the judge: ``text`` is the message content (``None`` when the reply had none,
    e.g. a malformed body), ``body`` the raw response text, ``usage`` the token counts if reported."""

    text: str | None
    body: str
    usage: dict[str, Any] | None


def api_base(endpoint: str) -> str:
    """The API base of ``endpoint`` (``https://api.openai.com/v1``, or a full ``.../chat/completions`` URL)."""
    base = endpoint.strip().rstrip("/")
    if not base.startswith(("http://", "https://")):
        raise JudgeError(f"the judge endpoint must be an http:// or https:// URL, got {endpoint!r}")
    suffix = "/chat/completions"
    return base[: -len(suffix)] if base.endswith(suffix) else base


class JudgeClient:
    """Asks ``model`` at ``endpoint`` one chat completion at a time; safe to share between threads.

    ``timeout_s`` bounds each request; a failed request is tried ``max_retries`` more times,
    waiting ``backoff_s * 2**attempt`` seconds (times a random 0.5-1 so that concurrent
    requests spread out, at most ``max_backoff_s``) or what the server's ``Retry-After`` asks.
    ``temperature`` and ``max_tokens`` go into every request (``max_tokens`` only when set).
    """

    def __init__(
        self,
        endpoint: str,
        model: str,
        *,
        api_key: str | None = None,
        timeout_s: float = 120.0,
        max_retries: int = 5,
        backoff_s: float = 1.0,
        max_backoff_s: float = 60.0,
        temperature: float = 0.0,
        max_tokens: int | None = None,
        connections: int = 4,
    ):
        if not model:
            raise JudgeError("name the judge model (--judge-model), e.g. gpt-4o")
        if timeout_s <= 0 or max_retries < 0 or backoff_s < 0:
            raise JudgeError(
                f"need timeout > 0, retries >= 0 and backoff >= 0, got {timeout_s}, {max_retries}, {backoff_s}"
            )
        self.base = api_base(endpoint)
        self.model = model
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._stop = threading.Event()
        self._options: dict[str, Any] = {"temperature": temperature}
        if max_tokens is not None:
            self._options["max_tokens"] = max_tokens
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(
            headers=headers,
            timeout=timeout_s,
            limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
        )

    def close(self) -> None:
        """Close the connections."""
        self._http.close()

    def stop(self) -> None:
        """Make every `ask` in progress or to come give up before its next try (for an interrupted run)."""
        self._stop.set()

    def __enter__(self) -> JudgeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def check(self) -> None:
        """Fail fast, before any model is loaded: the endpoint must answer and accept the key.

        Asks ``GET {base}/models`` (free on OpenAI-compatible servers). A server without that
        route (404 or another status) passes; only an unreachable host or 401/403 fails.
        """
        try:
            response = self._http.get(f"{self.base}/models")
        except httpx.HTTPError as e:
            raise JudgeError(f"cannot reach the judge at {self.base}: {_describe(e)}; check --endpoint") from None
        _refuse_key(response, self.base)

    def ask(self, messages: list[dict[str, str]]) -> JudgeReply:
        """The judge's reply to ``messages``, retrying throttling, server errors and timeouts.

        Raises:
            JudgeError: the key was refused (401/403) or the request was rejected (other 4xx).
            JudgeUnavailable: every try failed; the message has the last failure.
        """
        body = {"model": self.model, "messages": messages, **self._options}
        url = f"{self.base}/chat/completions"
        failure, tries = "stopped before asking", 0
        for attempt in range(self.max_retries + 1):
            if self._stop.is_set():
                break
            tries += 1
            wait = min(self.max_backoff_s, self.backoff_s * 2**attempt) * random.uniform(0.5, 1.0)
            try:
                response = self._http.post(url, json=body)
            except httpx.HTTPError as e:
                failure = _describe(e)
            else:
                if response.status_code == 200:
                    return _reply(response.text)
                _refuse_key(response, self.base)
                failure = f"HTTP {response.status_code}: {_snippet(response.text)}"
                if response.status_code != 429 and response.status_code < 500:
                    raise JudgeError(f"the judge at {url} rejected the request ({failure})")
                wait = _retry_after(response, self.max_backoff_s) or wait
            if attempt < self.max_retries:
                self._stop.wait(wait)
        raise JudgeUnavailable(f"the judge at {url} failed after {tries} tries; last: {failure}")


def _reply(text: str) -> JudgeReply:
    """A 200 response as a `JudgeReply`; a body that is not a chat completion has ``text=None``."""
    try:
        data = json.loads(text)
        content = data["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        return JudgeReply(text=None, body=text, usage=None)
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else None
    return JudgeReply(text=content if isinstance(content, str) else None, body=text, usage=usage)


def _refuse_key(response: httpx.Response, base: str) -> None:
    if response.status_code in (401, 403):
        raise JudgeError(
            f"the judge at {base} refused the API key (HTTP {response.status_code}: {_snippet(response.text)}); "
            "pass --api-key or set OPENAI_API_KEY"
        )


def _retry_after(response: httpx.Response, cap: float) -> float | None:
    """Seconds the server asked to wait (``Retry-After`` in seconds), at most ``cap``."""
    try:
        return min(cap, max(0.0, float(response.headers.get("retry-after", ""))))
    except ValueError:
        return None


def _describe(error: Exception) -> str:
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def _snippet(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."
