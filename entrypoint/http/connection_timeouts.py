"""A read timeout for request headers, which uvicorn does not have (measured: clients that sent partial
headers held their connections forever; 20 were still open after 157 s).

uvicorn's h11 protocol times out only idle keep-alive connections, after a response. This subclass also
closes a connection whose request headers are not complete `header_timeout` seconds after it opened or
after the first byte of its next request, answering 408 as nginx does for client_header_timeout. (The body
has its own timeout, per read, in `client_connection.read_body`.) h11 is uvicorn's pure-Python protocol
and the one it picks here (httptools is not installed; it compiles at install time).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

from entrypoint.protocol.errors import make_body

logger = logging.getLogger("lmi.http")


def timed_protocol(header_timeout: float) -> type[H11Protocol]:
    """The protocol class for `uvicorn.Config(http=...)` (uvicorn instantiates it per connection)."""
    return type("TimedH11Protocol", (_TimedH11Protocol,), {"header_timeout": header_timeout})


class _TimedH11Protocol(H11Protocol):
    header_timeout: float = 30.0

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        before = self.cycle
        if before is not None and before.response_complete and self._header_timer is None:
            self._arm()  # the first bytes of the next request on a kept-alive connection
        super().data_received(data)
        if self.cycle is not before:  # h11 parsed a complete request head
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._header_timer = self.loop.call_later(self.header_timeout, self._headers_timed_out)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_timed_out(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or (self.cycle is not None and not self.cycle.response_complete):
            return
        client = "%s:%d" % self.client if self.client else "unknown client"
        logger.info("closing the connection from %s: no complete request headers within %g s "
                    "(request_read_timeout)", client, self.header_timeout)
        body = json.dumps(make_body(408, "RequestTimeout", f"the request headers did not arrive within "
                                    f"{self.header_timeout:g} s (request_read_timeout)")).encode()
        # Written raw: h11 has no request to answer yet, so it would refuse to send a response.
        self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                             b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
        self.transport.close()
