"""HTTP/1.1 connections for `pixelwise serve`: uvicorn's h11 protocol with read deadlines and a JSON voice.

uvicorn has no deadline for a request head that never completes, and its `limit_concurrency` counts
open connections: 64 idle sockets once made every request, `/healthz` included, a 503. So the service
does not use `limit_concurrency` (requests are admitted by the app's own queue) and each connection is
watched here instead:

* a connection with no request in progress must deliver a complete request head within
  `header_timeout` seconds of opening or of its previous answer. A silent one is closed, a half-sent
  head is answered 408. The clock is not restarted by each byte, so trickling a head gains nothing;
* a request body must be complete within `body_timeout` seconds of its head: the app's middleware
  answers 408 when it reads the body, and a body nobody reads is dropped with the connection here;
* at most `max_connections` are open: one more evicts the connection that has waited longest without
  a request in progress, so a health check still gets through a flood of idle sockets;
* uvicorn's own answer to a malformed request (400) is JSON, like every answer of the service.
"""

from __future__ import annotations

import asyncio
import http
import json
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


def error_body(message: str) -> bytes:
    """The service's one error shape, as bytes."""
    return json.dumps({"error": message}).encode()


class ServeProtocol(H11Protocol):
    """uvicorn's h11 protocol with the deadlines and the connection cap above; `limits` is a `ServeLimits`."""

    limits: Any = None  # set on the subclass made by `protocol_class`

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None
        self.waiting_since: float | None = None  # when the client began to owe us a request head

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections and not self._evict_idle():
            self._reply_and_close(503, f"busy: {self.limits.max_connections} connections are open; retry shortly")
            return
        self._watch()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self.waiting_since = None  # the wait for the next request head starts now
        self._watch()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to bytes that are not HTTP/1.1, as JSON."""
        body = error_body(f"malformed HTTP request ({msg.rstrip('.')}); send a valid HTTP/1.1 request")
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        self.transport.write(self.conn.send(h11.Response(status_code=400, headers=headers, reason=b"Bad Request")))
        self.transport.write(self.conn.send(h11.Data(data=body)))
        self.transport.write(self.conn.send(h11.EndOfMessage()))
        self.transport.close()

    def _watch(self) -> None:
        """Arm the deadline when the client owes us a request head (or an unread body), else disarm it."""
        if self.transport is None or self.transport.is_closing():
            return self._cancel()
        in_flight = self.cycle is not None and not self.cycle.response_complete
        waiting = not in_flight and self.conn.their_state in (h11.IDLE, h11.SEND_BODY)
        if not waiting:
            self.waiting_since = None
            return self._cancel()
        if self.waiting_since is None:
            self.waiting_since = self.loop.time()
            self._cancel()
            self._deadline = self.loop.call_later(self.limits.header_timeout, self._on_deadline)

    def _on_deadline(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        partial_head = self.conn.their_state is h11.IDLE and bool(self.conn.trailing_data[0])
        if partial_head:
            self._reply_and_close(
                408,
                f"the request head was not complete within {self.limits.header_timeout:g} s; "
                "send the whole request without pausing",
            )
        else:  # an idle connection, or a body the app answered without reading: nobody is waiting for a reply
            self.transport.close()

    def _evict_idle(self) -> bool:
        """Close the connection that has waited longest for a request head; False if every one is busy."""
        idle = [c for c in self.connections if c is not self and getattr(c, "waiting_since", None) is not None]
        if not idle:
            return False
        oldest = min(idle, key=lambda c: c.waiting_since)
        oldest._cancel()
        oldest.waiting_since = None
        oldest.transport.close()
        return True

    def _reply_and_close(self, status: int, message: str) -> None:
        """Write a JSON error as raw HTTP/1.1 (h11 cannot answer a request it has not parsed) and close."""
        body = error_body(message)
        head = (
            f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
        ).encode()
        self.transport.write(head + body)
        self.transport.close()

    def _cancel(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None


def protocol_class(limits: Any) -> type[ServeProtocol]:
    """The protocol class uvicorn builds a connection with (`uvicorn.Config(http=...)`), bound to `limits`."""
    return type("ServeProtocol", (ServeProtocol,), {"limits": limits})
