"""Local web safety: a web page the user happens to open must not be able to drive their local server.

A page can POST to http://127.0.0.1:8000 without asking (a "simple" cross-origin request: text/plain, no
custom header), or make its own host name resolve to 127.0.0.1 (DNS rebinding) and then read the answers.
Three checks, in front of every route, answered in OpenAI's error schema:

- Host: the Host header must name an allowed host (default: the loopback names and the address the server
  is bound to; `--allowed-host` adds names, `*` allows any, for a server behind a proxy that checks).
- Origin: a browser's cross-origin request carries Origin; it must name an allowed host too (a page served
  by this server itself passes: same host).
- POST bodies must be `Content-Type: application/json`: a form or text/plain POST (no CORS preflight) is
  refused with 415 before it reaches a handler.
"""
from __future__ import annotations

import json
from typing import Iterable
from urllib.parse import urlsplit

from .api_errors import APIError

LOOPBACK = ("localhost", "127.0.0.1", "::1")


def host_name(value: str) -> str:
    """'example.org:8000' -> 'example.org'; '[::1]:8000' -> '::1'."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def allowed_hosts(bound: str, extra: Iterable[str] = ()) -> set[str]:
    hosts = set(LOOPBACK) | {host_name(h) for h in extra if h}
    if bound not in ("0.0.0.0", "::", ""):
        hosts.add(host_name(bound))
    return hosts


class LocalGuard:
    """Pure ASGI middleware: Host / Origin allow-list and a JSON content type for POST."""

    def __init__(self, app, hosts: set[str]):
        self.app = app
        self.any_host = "*" in hosts
        self.hosts = hosts

    def _allowed(self, name: str) -> bool:
        return self.any_host or name in self.hosts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        error = self.check(scope["method"], headers)
        if error is None:
            return await self.app(scope, receive, send)
        body = json.dumps(error.body()).encode()
        await send({"type": "http.response.start", "status": error.status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    def check(self, method: str, headers: dict[str, str]) -> APIError | None:
        host = host_name(headers.get("host", ""))
        if not self._allowed(host):
            return APIError(403, f"Host {host!r} is not allowed: this server answers to {', '.join(sorted(self.hosts))} "
                                 f"(add names with --allowed-host)", code="host_not_allowed")
        origin = headers.get("origin")
        if origin is not None:
            origin_host = urlsplit(origin).hostname if origin != "null" else None
            if origin_host is None or not self._allowed(origin_host.lower()):
                return APIError(403, f"requests from the web page at {origin!r} are not allowed (add its host with "
                                     f"--allowed-host)", code="origin_not_allowed")
        if method == "POST":
            media = headers.get("content-type", "").split(";")[0].strip().lower()
            if media != "application/json":
                return APIError(415, f"send the body as JSON with 'Content-Type: application/json' "
                                     f"(got {media or 'no content type'!r})", code="unsupported_media_type")
        return None
