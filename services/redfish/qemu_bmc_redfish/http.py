"""uvicorn's httptools protocol with the limits of a service that anyone on the network can send
to before it knows who they are, each answered with a Redfish error:

* a request method HTTP parsers do not know: 501 Not Implemented (DSP0266 §7.2: an unsupported
  method is answered 405 or 501), not the parser's 400;
* a request line and headers of more than MAX_HEAD_BYTES: 431;
* a body of more than ``[redfish] max_body_bytes`` (1 MiB): 413 with the Base registry's
  PayloadTooLarge, at once for a Content-Length over it (the application never starts, the body is
  never read, no ``100 Continue`` is sent), and as soon as a chunked body passes it (what came is
  dropped; the application, which was reading it, sees the client gone). There is no upload
  endpoint (SimpleUpdate takes an ImageURI, not an image), so one limit is for every path.

After such an answer the connection is closed (``Connection: close``) once the client has stopped
sending or LINGER_SECONDS have passed; what it sends meanwhile is read and dropped, never kept, so
that a client that sends its whole body before it reads (most do) gets the answer rather than a
connection reset (RFC 9112 §9.6 "Tear-down"). Reading costs (TLS decrypts every byte), so one
client address may have DRAIN_RATE bytes a second read and dropped so, after a first DRAIN_BURST:
one refused body of any size a client may mean is read whole, and the client gets its answer; a
stream of them from one address gets its connections cut (reset) instead, and cannot take the
processor from the other clients."""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from typing import Any

import httptools
import msgspec
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

from .errors import RedfishError
from .odata import security_headers

DEFAULT_MAX_BODY_BYTES = 1 << 20
MAX_HEAD_BYTES = 64 << 10
HEADER_COST = 32
"""Bytes counted for each header besides its name and value (what keeping it costs)."""
LINGER_SECONDS = 10.0
DRAIN_RATE = 32 << 20
DRAIN_BURST = 128 << 20
MAX_DRAINING_SOURCES = 4096


class DrainBudget:
    """How many refused bytes each client address may still have read now (a token bucket)."""

    def __init__(self, rate: float = DRAIN_RATE, burst: float = DRAIN_BURST) -> None:
        self.rate, self.burst = rate, burst
        self.buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        """Address → (bytes it may have read, when that was reckoned)."""

    def take(self, source: str, size: int) -> float:
        """Count ``size`` bytes read for ``source``: how long it should have waited for them (0:
        within its budget)."""
        now = time.monotonic()
        tokens, then = self.buckets.pop(source, (self.burst, now))
        tokens = min(self.burst, tokens + (now - then) * self.rate) - size
        self.buckets[source] = (tokens, now)
        if len(self.buckets) > MAX_DRAINING_SOURCES:
            self.buckets.popitem(last=False)
        return max(0.0, -tokens / self.rate)


DRAINING = DrainBudget()


class Refused(Exception):
    """Raised in a parser callback to stop reading a request and answer it with ``error``."""

    def __init__(self, error: RedfishError) -> None:
        super().__init__(error.message_id)
        self.error = error


class RedfishHttpProtocol(HttpToolsProtocol):
    def __init__(self, config: Config, server_state: ServerState, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        state = getattr(config.app, "state", None)  # the FastAPI application (app.create_app) says its limit
        self.max_body_bytes: int = getattr(state, "max_body_bytes", DEFAULT_MAX_BODY_BYTES)
        self.head_bytes = 0
        self.body_bytes = 0
        self.started: Any = None
        """The request-response cycle of the request being read, once its headers are complete."""
        self.draining = False
        self.timers: list[asyncio.TimerHandle] = []

    def data_received(self, data: bytes) -> None:
        if self.draining:  # answered: dropped until the client stops or LINGER_SECONDS have passed
            if DRAINING.take(self.client[0] if self.client else "", len(data)):
                self.transport.abort()  # its address is over its budget: no more reading for it
            return
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserInvalidMethodError:
            self.answer(RedfishError(501, "OperationNotAllowed"))
            self.transport.close()
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, Refused):
                self.refuse(exc.__context__.error)
            else:
                self.send_400_response("Invalid HTTP request received.")
        except httptools.HttpParserError:
            self.send_400_response("Invalid HTTP request received.")
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()

    def send_400_response(self, msg: str) -> None:
        self.answer(RedfishError(400, "GeneralError", msg))
        self.transport.close()

    def answer(self, error: RedfishError) -> None:
        """Write ``error`` as the response, saying that the connection closes."""
        body = msgspec.json.encode(error.body())
        head = [STATUS_LINE[error.status], b"content-type: application/json; charset=utf-8\r\n",
                b"odata-version: 4.0\r\n", b"cache-control: no-store\r\n",
                b"content-length: %d\r\nconnection: close\r\n" % len(body)]
        head += [name + b": " + value + b"\r\n" for name, value in security_headers(self.scheme or "http")]
        self.transport.write(b"".join(head) + b"\r\n" + body)

    def refuse(self, error: RedfishError) -> None:
        """Answer ``error`` to the request being read (unless the application has answered it
        already), then drop what comes until the connection closes."""
        cycle = self.started
        if self.pipeline or (self.cycle is not None and self.cycle.response_started and
                             not self.cycle.response_complete):
            self.transport.close()  # an answer to this or an earlier request is under way: no room for this one
            return
        if cycle is None or not cycle.response_complete:
            if cycle is not None:  # the application reading the body: it sees the client gone
                cycle.disconnected = True
                cycle.body = bytearray()
                cycle.message_event.set()
            self.answer(error)
        self.draining = True
        self.flow.resume_reading()
        self.timers.append(self.loop.call_later(LINGER_SECONDS, self.transport.close))

    def eof_received(self) -> None:
        if self.draining:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        """The timers go with the connection: they would keep the TLS transport, and what its
        buffers held, for LINGER_SECONDS more."""
        for timer in self.timers:
            timer.cancel()
        self.timers.clear()
        super().connection_lost(exc)

    # parser callbacks

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.head_bytes = self.body_bytes = 0
        self.started = None

    def on_url(self, url: bytes) -> None:
        self.head_bytes += len(url)
        if self.head_bytes > MAX_HEAD_BYTES:
            raise Refused(RedfishError(431, "GeneralError", f"request line and headers over {MAX_HEAD_BYTES} bytes"))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head_bytes += len(name) + len(value) + HEADER_COST
        if self.head_bytes > MAX_HEAD_BYTES:
            raise Refused(RedfishError(431, "GeneralError", f"request line and headers over {MAX_HEAD_BYTES} bytes"))
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        declared = next((value for name, value in self.headers if name == b"content-length"), b"")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            raise Refused(RedfishError(413, "PayloadTooLarge"))
        before = self.cycle
        super().on_headers_complete()
        self.started = self.cycle if self.cycle is not before else None  # None: a WebSocket upgrade

    def on_body(self, body: bytes) -> None:
        self.body_bytes += len(body)
        if self.body_bytes > self.max_body_bytes:
            raise Refused(RedfishError(413, "PayloadTooLarge"))
        super().on_body(body)
