"""A client that stalls holds nothing for long: a connection that sends no headers is closed, a body that does not
arrive is a 408, a response nobody reads is abandoned. uvicorn in this process with short limits, a tiny trio."""
from __future__ import annotations

import socket
import threading
import time

import pytest
import uvicorn

from proxytune import ProxyTuner
from proxytune.server import create_app
from proxytune.server import limits
from proxytune.server.timeouts import HeaderTimeoutH11
from tiny_server import free_port


class QuickHeaders(HeaderTimeoutH11):
    header_timeout = 0.5


@pytest.fixture(scope="module")
def served(trio, tok):
    app = create_app(ProxyTuner(*trio, tokenizer=tok))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, http=QuickHeaders, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield port
    server.should_exit = True
    thread.join(10)


def closed_after(sock: socket.socket, limit: float) -> float:
    """Seconds until the server closes `sock` (reads until EOF), at most `limit`."""
    sock.settimeout(limit)
    start = time.monotonic()
    while sock.recv(4096):
        pass
    return time.monotonic() - start


def test_a_connection_that_sends_no_headers_is_closed(served):
    with socket.create_connection(("127.0.0.1", served)) as idle:
        assert closed_after(idle, 10) < 3
    with socket.create_connection(("127.0.0.1", served)) as trickle:
        trickle.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and never the rest
        assert closed_after(trickle, 10) < 3


def test_a_body_that_does_not_arrive_is_a_408(served, monkeypatch):
    monkeypatch.setattr(limits.read_body, "__defaults__", (limits.MAX_BODY_BYTES, 0.5))
    with socket.create_connection(("127.0.0.1", served)) as slow:
        slow.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"prompt\":")
        slow.settimeout(10)
        answer = b""
        while chunk := slow.recv(4096):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 408") and b"did not arrive within" in answer
