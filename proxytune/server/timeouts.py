"""Time limits on the HTTP side, so that a client that stalls holds nothing for long.

- Headers: a request's headers must be complete within HEADER_TIMEOUT_S of the connection's opening (or of
  the first byte of a later request on it), else the connection is closed; between requests, uvicorn's own
  keep-alive time applies.
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
    """uvicorn's h11 protocol with a deadline for a request's headers: HEADER_TIMEOUT_S from the connection's
    opening (or from the first byte of a later request on it) until its headers are complete, else the
    connection is closed (a client that sends nothing, or trickles its headers)."""

    header_timeout = HEADER_TIMEOUT_S
    header_deadline = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self.cycle is None or self.cycle.response_complete:  # bytes of a request whose headers are not in yet
            self._arm()
        super().data_received(data)
        if self.cycle is not None and not self.cycle.response_complete:  # its headers are complete
            self._disarm()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self.header_deadline is None:
            self.header_deadline = self.loop.call_later(self.header_timeout, self.timeout_keep_alive_handler)

    def _disarm(self) -> None:
        if self.header_deadline is not None:
            self.header_deadline.cancel()
            self.header_deadline = None


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
