"""Connection-level limits uvicorn does not have: a deadline for the request head.

uvicorn closes a keep-alive connection that stays idle after a response (``timeout_keep_alive``),
but a connection that never sends a complete request head (opened and left idle, or sending its
headers a byte at a time: "slowloris") is held forever, and with it a file descriptor and a
parser. :func:`head_deadline_protocol` returns uvicorn's own HTTP protocol class with a deadline:
the whole request head must arrive within ``seconds`` of the connection opening, or of the first
byte of the next request on a kept-alive connection; otherwise the server answers 408 and closes.
Slow bodies are bounded separately, in the ASGI layer (:class:`serving.http.RequestGuard`).
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging

log = logging.getLogger(__name__)

_TIMEOUT_RESPONSE = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
                     b"content-length: %d\r\n\r\n%s")
_TIMEOUT_BODY = (b'{"error":{"message":"the request head did not arrive in time","type":"invalid_request_error",'
                 b'"param":null,"code":"header_timeout"}}')


def _base_protocol() -> type:
    """The protocol uvicorn's ``http="auto"`` would pick: httptools when installed, else h11."""
    if importlib.util.find_spec("httptools") is not None:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        return HttpToolsProtocol
    from uvicorn.protocols.http.h11_impl import H11Protocol

    return H11Protocol


def head_deadline_protocol(seconds: float) -> type:
    """uvicorn's HTTP protocol class, closing connections whose request head takes over ``seconds``."""
    base = _base_protocol()

    class HeadDeadlineProtocol(base):  # type: ignore[misc, valid-type]
        head_timeout = seconds

        def connection_made(self, transport: asyncio.Transport) -> None:
            super().connection_made(transport)
            self._head_timer: asyncio.TimerHandle | None = None
            self._arm_head_timer()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            # Between requests (none yet, or the last one answered) the head is still on its way.
            if self.cycle is None or self.cycle.response_complete:
                self._arm_head_timer()
            else:
                self._cancel_head_timer()

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

        def _head_expired(self) -> None:
            self._head_timer = None
            if self.transport.is_closing() or not (self.cycle is None or self.cycle.response_complete):
                return
            log.info("closing a connection whose request head took over %.0f s", self.head_timeout)
            self.transport.write(_TIMEOUT_RESPONSE % (len(_TIMEOUT_BODY), _TIMEOUT_BODY))
            self.transport.close()

    return HeadDeadlineProtocol
