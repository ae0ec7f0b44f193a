"""Time limits on the HTTP side, so that a client that stalls holds nothing for long.

- Headers: a connection must deliver a request's headers within HEADER_TIMEOUT_S of opening (uvicorn's own
  keep-alive timer, armed on connect instead of only after a response), else it is closed; a new request on a
  kept-alive connection has uvicorn's keep-alive time.
- Body: limits.read_body (BODY_TIMEOUT_S).
- Sending: every write of a response must go through within SEND_TIMEOUT_S. A client that stops reading fills
  its socket and then the server's transport buffer; the write then waits, and past the limit the response is
  abandoned, the connection closed and the job cancelled (its rows leave the batch at the next step). Its
  events waiting in the job's queue are bounded by scheduler.MAX_PENDING_ITEMS meanwhile.
"""
from __future__ import annotations

import asyncio
import logging

from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("proxytune.server")

HEADER_TIMEOUT_S = 10.0
SEND_TIMEOUT_S = 30.0


class HeaderTimeoutH11(H11Protocol):
    """uvicorn's h11 protocol with the keep-alive timer armed on connect: it is disarmed when a request's headers
    are complete, so a connection that sends none (or trickles them) is closed after HEADER_TIMEOUT_S."""

    header_timeout = HEADER_TIMEOUT_S

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.timeout_keep_alive_task = self.loop.call_later(self.header_timeout, self.timeout_keep_alive_handler)


class SendTimeout:
    """Pure ASGI middleware: a response whose writes do not go through within `timeout` seconds is abandoned
    (uvicorn then closes the connection)."""

    def __init__(self, app, timeout: float = SEND_TIMEOUT_S):
        self.app, self.timeout = app, timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def timed_send(message):
            try:
                await asyncio.wait_for(send(message), self.timeout)
            except asyncio.TimeoutError:
                raise ReaderTooSlow(f"the client read nothing for {self.timeout:g} s") from None

        try:
            await self.app(scope, receive, timed_send)
        except ReaderTooSlow as error:
            log.warning("closed a connection: %s", error)


class ReaderTooSlow(Exception):
    pass
