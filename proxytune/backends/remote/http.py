"""A small, careful HTTP client for OpenAI-compatible servers: one pooled httpx connection per
server, retries with exponential backoff and jitter on 429 / 5xx / connection errors (honouring
Retry-After), and errors that name the role and the URL but never the API key.
"""
from __future__ import annotations

import email.utils
import logging
import random
import threading
import time
from dataclasses import dataclass

from ...errors import ProxyTuneError, SourceFailure

try:
    import httpx
except ImportError:  # an optional dependency: only remote models need it
    raise ProxyTuneError("models behind OpenAI-compatible servers need httpx: pip install 'proxytune[remote]'") from None

log = logging.getLogger("proxytune.remote")

RETRIED_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
REFUSED_STATUS = {400, 413, 422}  # the server refused this request's content: the row is at fault, not the server


class RemoteSourceError(SourceFailure):
    """A remote model did not answer usefully after all tries; the message names role and URL."""


class RemoteRefusal(RemoteSourceError):
    """The server refused one request for what it holds (HTTP 400/413/422: too long for its context,
    a token it rejects): that row fails, the other rows of its batch go on."""


@dataclass(frozen=True)
class RetryPolicy:
    tries: int = 4  # attempts in all, the first included
    backoff: float = 0.5  # seconds before the 2nd try; doubles each time, with jitter
    max_backoff: float = 20.0  # cap on one wait, Retry-After included
    timeout: float = 120.0  # seconds to wait for an answer (read)
    connect_timeout: float = 5.0

    def delay(self, attempt: int, retry_after: float | None) -> float:
        """Wait before try `attempt + 1` (attempt counts from 1). Jitter spreads the retries of the
        concurrent rows of a batch so that they do not hit a recovering server in lockstep."""
        exponential = min(self.max_backoff, self.backoff * 2 ** (attempt - 1))
        wait = exponential * (0.5 + 0.5 * random.random())
        if retry_after is not None:  # the server knows best, but never wait longer than the cap
            wait = max(wait, min(retry_after, self.max_backoff))
        return wait


def retry_after_seconds(response: httpx.Response) -> float | None:
    """Retry-After is either delta-seconds or an HTTP date (RFC 9110 §10.2.3)."""
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def server_message(response: httpx.Response) -> str:
    """The error text of an OpenAI-style error body ({"error": {"message": ...}}) or the raw body."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:300]
    if isinstance(body, dict):
        error = body.get("error", body.get("detail", body))
        if isinstance(error, dict):
            return str(error.get("message", error))[:300]
        return str(error)[:300]
    return str(body)[:300]


class OpenAIClient:
    """POSTs JSON to one server. Thread-safe: the rows of a batch call it from several threads and
    share its connection pool. `calls` counts HTTP requests that got an answer, retries included."""

    def __init__(self, base_url: str, role: str, api_key: str | None = None, policy: RetryPolicy = RetryPolicy(),
                 max_connections: int = 16):
        self.base_url = base_url.rstrip("/")
        self.role = role
        self.policy = policy
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        timeout = httpx.Timeout(policy.timeout, connect=policy.connect_timeout)
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        self.http = httpx.Client(headers=headers, timeout=timeout, limits=limits)
        self.calls = 0
        self.retries = 0
        self.bytes_sent = 0  # request bodies
        self.bytes_received = 0  # response bodies (as decoded: compression not counted)
        self._lock = threading.Lock()

    def __repr__(self) -> str:  # no headers: the API key must never reach a log or a traceback
        return f"OpenAIClient({self.base_url!r}, role={self.role!r})"

    def close(self) -> None:
        self.http.close()

    def url(self, path: str) -> str:
        """A path under the base URL, or an absolute URL as given (server extras live outside /v1)."""
        if path.startswith(("http://", "https://")):
            return path
        return f"{self.base_url}/{path.lstrip('/')}"

    def post(self, path: str, payload: dict, retry: bool = True) -> dict:
        """The decoded JSON answer. Retries transient failures; raises RemoteSourceError at the end."""
        url = self.url(path)
        tries = self.policy.tries if retry else 1
        problem = "no attempt made"
        for attempt in range(1, tries + 1):
            retry_after = None
            try:
                response = self.http.post(url, json=payload)
            except httpx.TransportError as error:  # refused, reset, timed out: worth another try
                problem = f"{type(error).__name__}: {str(error).rstrip('.') or 'no answer'}"
            else:
                with self._lock:
                    self.calls += 1
                    self.bytes_sent += len(response.request.content)
                    self.bytes_received += len(response.content)
                if response.status_code < 400:
                    try:
                        return response.json()
                    except ValueError:
                        raise RemoteSourceError(f"{self.role} model at {url} answered with invalid JSON: "
                                                f"{response.text[:200]!r}") from None
                problem = f"HTTP {response.status_code}: {server_message(response)}"
                if response.status_code not in RETRIED_STATUS:
                    error = RemoteRefusal if response.status_code in REFUSED_STATUS else RemoteSourceError
                    raise error(f"{self.role} model at {url} refused the request ({problem})")
                retry_after = retry_after_seconds(response)
            if attempt < tries:
                wait = self.policy.delay(attempt, retry_after)
                log.warning("%s model at %s: %s; retry %d of %d in %.2f s", self.role, url, problem, attempt,
                            tries - 1, wait)
                with self._lock:
                    self.retries += 1
                time.sleep(wait)
        raise RemoteSourceError(f"{self.role} model at {url} failed after {tries} "
                                f"{'try' if tries == 1 else 'tries'} ({problem})")

    def probe(self, path: str, payload: dict) -> dict | None:
        """One try at an optional endpoint: its JSON answer, or None when the server lacks it."""
        try:
            response = self.http.post(self.url(path), json=payload)
        except httpx.TransportError as error:
            raise RemoteSourceError(f"{self.role} model at {self.base_url} is unreachable "
                                    f"({type(error).__name__}: {error})") from None
        with self._lock:
            self.calls += 1
        if response.status_code >= 400:
            return None
        try:
            return response.json()
        except ValueError:
            return None
