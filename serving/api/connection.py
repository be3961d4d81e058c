"""Connection-level limits uvicorn does not have: a deadline and a size bound for the request head.

uvicorn closes a keep-alive connection that stays idle after a response (``timeout_keep_alive``),
but a connection that never sends a complete request head (opened and left idle, or sending its
headers a byte at a time: "slowloris") is held forever, and with it a file descriptor and a
parser. :func:`head_deadline_protocol` returns uvicorn's own HTTP protocol class with a deadline:
the whole request head must arrive within ``seconds`` of the connection opening, or of the first
byte of the next request on a kept-alive connection; otherwise the server answers 408 and closes.
The head must also fit in ``max_bytes``: uvicorn (with httptools) buffers headers of any size
before the app sees them (a 96 MiB header took ~200 MiB and stalled the loop for 6 s), so the bytes
of a head still on its way are counted as they arrive and past the limit the server answers 431
and closes, before any key check. A head that arrives whole in one read (at most the transport's
read size, 256 KiB) is measured by :class:`serving.api.http.RequestGuard`, which answers 431 too.
Slow bodies are bounded separately, in the ASGI layer.

The protocol also stamps each request with the moment its bytes were read
(``request.state.received_at``, :data:`RECEIVED_AT`): under a burst, handlers start one after
another on the event loop, so the time a handler starts can be tens of milliseconds after the
request arrived, and a latency target counted from the handler would be missed by that much.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import time

log = logging.getLogger(__name__)

RECEIVED_AT = "received_at"  # request.state key: time.monotonic() when the request's bytes were read

_TIMEOUT_RESPONSE = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
                     b"content-length: %d\r\n\r\n%s")
_TIMEOUT_BODY = (b'{"error":{"message":"the request head did not arrive in time","type":"invalid_request_error",'
                 b'"param":null,"code":"header_timeout"}}')
_TOO_LARGE_RESPONSE = (b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
                       b"connection: close\r\ncontent-length: %d\r\n\r\n%s")
_TOO_LARGE_BODY = (b'{"error":{"message":"request headers over the limit of %d bytes","type":"invalid_request_error",'
                   b'"param":null,"code":"headers_too_large"}}')


def _base_protocol() -> type:
    """The protocol uvicorn's ``http="auto"`` would pick: httptools when installed, else h11."""
    if importlib.util.find_spec("httptools") is not None:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        return HttpToolsProtocol
    from uvicorn.protocols.http.h11_impl import H11Protocol

    return H11Protocol


def head_deadline_protocol(seconds: float, max_bytes: int | None = None) -> type:
    """uvicorn's HTTP protocol class, closing connections whose request head takes over ``seconds``
    (408) or, still incomplete, has sent over ``max_bytes`` (431)."""
    base = _base_protocol()

    class HeadDeadlineProtocol(base):  # type: ignore[misc, valid-type]
        head_timeout = seconds
        head_limit = max_bytes

        def connection_made(self, transport: asyncio.Transport) -> None:
            super().connection_made(transport)
            self._head_timer: asyncio.TimerHandle | None = None
            self._head_bytes = 0
            self._arm_head_timer()

        def data_received(self, data: bytes) -> None:
            if self.transport.is_closing():
                return
            # The parser builds a request's scope, with a copy of this state, inside this call.
            self.app_state[RECEIVED_AT] = time.monotonic()
            super().data_received(data)
            # Between requests (none yet, or the last one answered) the head is still on its way.
            if self.cycle is None or self.cycle.response_complete:
                self._arm_head_timer()
                self._head_bytes += len(data)
                if self.head_limit is not None and self._head_bytes > self.head_limit:
                    self._head_too_large()
            else:
                self._cancel_head_timer()
                self._head_bytes = 0

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_head_timer()
            super().connection_lost(exc)

        def _arm_head_timer(self) -> None:
            # Armed once per request head, not on every byte: a trickle cannot extend it.
            if self._head_timer is None and not self.transport.is_closing():
                self._head_timer = self.loop.call_later(self.head_timeout, self._head_expired)

        def _cancel_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_too_large(self) -> None:
            self._cancel_head_timer()
            log.info("closing a connection whose request head grew over %d bytes", self.head_limit)
            body = _TOO_LARGE_BODY % self.head_limit
            self.transport.write(_TOO_LARGE_RESPONSE % (len(body), body))
            self.transport.close()

        def _head_expired(self) -> None:
            self._head_timer = None
            if self.transport.is_closing() or not (self.cycle is None or self.cycle.response_complete):
                return
            log.info("closing a connection whose request head took over %.0f s", self.head_timeout)
            self.transport.write(_TIMEOUT_RESPONSE % (len(_TIMEOUT_BODY), _TIMEOUT_BODY))
            self.transport.close()

    return HeadDeadlineProtocol
