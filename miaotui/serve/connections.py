"""Connections that cannot hold the server: a deadline for a request's headers (slow clients), a cap on their size.

uvicorn times out idle keep-alive connections but not a client that sends its headers a byte at a time; and it
answers oversized headers with a 400 and closes at once, which the client, still sending, sees as a reset.
`protocol(...)` returns uvicorn's h11 protocol with both handled: 408 when the headers take longer than the
deadline, 431 when they exceed the cap (the rest of what the client sends is read and dropped for a moment,
so it gets the answer rather than a reset).

>>> uvicorn.Config(app, http=protocol(header_timeout=10, max_header_bytes=65536))  # doctest: +SKIP
"""

from __future__ import annotations

import json
import re

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from miaotui.serve.guard import error_body

DRAIN_AFTER_REFUSAL_S = 1.0  # how long a refused connection's remaining input is read and dropped
DRAIN_LIMIT_BYTES = 16 << 20
REASONS = {408: "Request Timeout", 431: "Request Header Fields Too Large"}
HEADERS_END = re.compile(rb"\n\r?\n")  # the blank line after the headers, as h11 finds it


def headers_too_large(buffered: bytes, max_header_bytes: int) -> bool:
    r"""Whether the unparsed start of a request holds more than `max_header_bytes` of headers: more bytes than that
    with no end of the headers among the first of them. A request whose body arrives in the same read as its
    headers (a busy server reads large chunks) is not refused: its body is the app's to limit (413).

    >>> headers_too_large(b"POST / HTTP/1.1\r\nhost: x\r\n\r\n" + b"a" * 100, 64)
    False
    >>> headers_too_large(b"GET / HTTP/1.1\r\nx: " + b"a" * 100, 64)
    True
    """
    return len(buffered) > max_header_bytes and not HEADERS_END.search(buffered, 0, max_header_bytes + 3)


def protocol(header_timeout: float, max_header_bytes: int = 64 << 10) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a header deadline and a header size cap."""

    class GuardedProtocol(H11Protocol):
        def __init__(self, config, *args, **kwargs):
            config.h11_max_incomplete_event_size = max_header_bytes + 1  # we answer first, with a 431
            super().__init__(config, *args, **kwargs)
            self._deadline = None
            self._dropped: int | None = None  # bytes dropped after a refusal

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._watch()

        def connection_lost(self, exc) -> None:
            self._cancel()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._dropped is not None:
                self._dropped += len(data)
                if self._dropped > DRAIN_LIMIT_BYTES:
                    self.transport.close()
                return
            waiting = self.conn.their_state is h11.IDLE
            if waiting and headers_too_large(bytes(self.conn.trailing_data[0]) + data, max_header_bytes):
                return self._refuse(431, f"request headers larger than {max_header_bytes} bytes")
            super().data_received(data)
            self._watch()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._watch()

        def _watch(self) -> None:
            """Run the header deadline while the connection waits for a request's headers."""
            waiting = self.conn.their_state is h11.IDLE and not self.transport.is_closing()
            # a request begun, or a new connection that has sent nothing yet (idle keep-alive has its own timeout)
            started = bool(self.conn.trailing_data[0]) or self.cycle is None
            if waiting and started and self._deadline is None:
                self._deadline = self.loop.call_later(header_timeout, self._expired)
            elif not waiting:
                self._cancel()

        def _cancel(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expired(self) -> None:
            self._deadline = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self._refuse(408, f"the request headers did not arrive within {header_timeout:g} s")

        def _refuse(self, status: int, message: str) -> None:
            self._cancel()
            body = json.dumps(error_body(message, "invalid_request_error")).encode()
            head = (
                f"HTTP/1.1 {status} {REASONS[status]}\r\n"
                f"content-type: application/json\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n"
            )
            self.transport.write(head.encode() + body)
            self._dropped = 0
            self.loop.call_later(DRAIN_AFTER_REFUSAL_S, self.transport.close)

    return GuardedProtocol
