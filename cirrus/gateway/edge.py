"""The edge: what a client may make the daemon do before its request is complete, bounded.

uvicorn's httptools protocol has no cap on the request line or the headers, and httptools keeps a
header it is still reading by appending to a bytes object, so one huge header costs time that grows
with the square of its size, on the event loop that the gateway, the admin API and the controller
share. `EdgeProtocol` is that protocol with limits (`EdgeLimits`):

- at most `max_head_bytes` of a request head (its request line and header lines, as sent) are ever
  fed to the parser: a head that does not end within them is answered 431, a URL over
  `max_url_bytes` 414, more than `max_headers` headers 431 (`Connection: close`); then the
  connection reads and drops what the client still sends for a moment, so that it sees the answer,
  and is closed;
- a head not complete within `header_timeout_s` of the connection (or, on a kept-alive connection,
  of its first byte) is answered 408 (closed silently when nothing came) and the connection closed;
- once a head is complete, its body must not stall: no `body_timeout_s` may pass without a byte of
  it, from the head's end to the first byte and between bytes, until the message is complete (chunk
  sizes and extensions are not body bytes; time that the request waits behind a pipelined one, that
  reading is paused for the app, or that the client awaits `100 Continue` does not count). A stalled
  body is answered 408 and the connection closed, or closed at once when a response has begun. Once
  body bytes flow, the gateway also bounds the whole body by the API's `timeout_s`;
- past `max_connections` open connections a new one is answered 503 and closed at once;
- with TLS (`tls`), the edge puts the loop's TLS layer on the accepted TCP connection itself, so that
  a connection counts against `max_connections` from its accept and its handshake is part of its
  first head's `header_timeout_s` (with `create_server(ssl=...)` the protocol would see it only once
  its handshake is done, and the loop would wait 60 s for that).

Each of these is logged at most once a second per server and kind, with a count. On the hot path
the cost is an integer add and compare per read, two length checks and two clock reads per request
(one more per read of body bytes); one timer per connection, re-armed lazily, none per request
(docs/security.md).
"""

from __future__ import annotations

import asyncio
import http
import logging
import resource
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger("cirrus.edge")

LOG_EVERY_S = 1.0  # each kind of refusal is logged at most this often per server
LINGER_S = 1.0  # after a 414/431, what the client still sends is read and dropped this long at most
LINGER_MAX_BYTES = 4 * 1024 * 1024  # ... and this much at most
REQUEST_LINE_SLACK = 64  # a request line's method, version and spaces, beyond its URL


@dataclass(frozen=True)
class EdgeLimits:
    """The bounds one listening server puts on its clients (see the module's docstring)."""

    max_url_bytes: int = 8 * 1024
    max_header_bytes: int = 64 * 1024  # the header lines as sent, in all
    max_headers: int = 100
    header_timeout_s: float = 10.0
    body_timeout_s: float = 10.0  # the longest a request body may go without a byte, once its head is complete
    max_connections: int = 1000

    @property
    def max_head_bytes(self) -> int:
        """The most of one request head (request line and header lines) that is ever parsed."""
        return self.max_url_bytes + REQUEST_LINE_SLACK + self.max_header_bytes


class EdgeLog:
    """Refusals of one server, logged at most once every `every_s` per kind, with how many there were."""

    def __init__(self, server: str, every_s: float = LOG_EVERY_S) -> None:
        self.server = server
        self.every_s = every_s
        self.totals: dict[str, int] = {}
        self._unreported: dict[str, int] = {}
        self._last: dict[str, float] = {}

    def event(self, kind: str, detail: str) -> None:
        self.totals[kind] = self.totals.get(kind, 0) + 1
        count = self._unreported.get(kind, 0) + 1
        now = time.monotonic()
        if now - self._last.get(kind, -self.every_s) < self.every_s:
            self._unreported[kind] = count
            return
        self._last[kind] = now
        self._unreported[kind] = 0
        more = f" ({count} like it since the last report)" if count > 1 else ""
        log.warning("%s: %s%s", self.server, detail, more)


class _Refused(Exception):
    """Raised from a parser callback to stop parsing a head that broke a limit."""


def _response(status: int, extra: bytes = b"") -> bytes:
    phrase = http.HTTPStatus(status).phrase
    body = f"{phrase}\n".encode()
    return (
        f"HTTP/1.1 {status} {phrase}\r\ncontent-type: text/plain; charset=utf-8\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n".encode()
        + extra
        + b"\r\n"
        + body
    )


RESPONSES = {
    408: _response(408),
    414: _response(414),
    431: _response(431),
    503: _response(503, b"retry-after: 1\r\n"),
}


class EdgeProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, bounded. Use `edge_protocol(...)` to get one for a server."""

    limits: EdgeLimits = EdgeLimits()
    edge_log: EdgeLog = EdgeLog("server")
    tls: ssl.SSLContext | None = None  # the server's TLS, put on here (see the module's docstring)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._max_head = self.limits.max_head_bytes
        self._max_url = self.limits.max_url_bytes
        self._max_headers = self.limits.max_headers
        # Whether a wait may end before the timer armed for an earlier one fires (then it is re-armed).
        self._uneven_waits = self.limits.header_timeout_s != self.limits.body_timeout_s
        self._head_open = True  # the next bytes belong to a request head
        self._head_bytes = 0  # bytes of the open head fed to the parser so far
        self._heads = 0  # heads completed on this connection
        # When the client's current wait began: the open head's first byte (or the connection), or
        # the open body's last byte (or its head's end). None: the client owes nothing now.
        self._since: float | None = None
        self._timer: asyncio.TimerHandle | None = None  # one per connection, re-armed lazily
        self._handshaking = False  # TLS: the handshake runs (self.transport is the TCP connection)
        self._refusal: int | None = None  # the status a callback refused the head with
        self._lingering = False  # refused: what comes is dropped
        self._linger_left = 0

    # --- connections -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if self._handshaking:  # from the TLS layer, its handshake done: HTTP over TLS from here on
            self._handshaking = False
            super().connection_made(transport)
            return
        if len(self.connections) >= self.limits.max_connections:
            self.transport = transport
            self._lingering = True
            self._head_open = False
            if self.tls is None:  # a TLS client could not read it
                transport.write(RESPONSES[503])
            transport.close()
            self.edge_log.event(
                "refused",
                f"refused a connection from {_peer(transport)}: {len(self.connections)} open, "
                f"the limit is {self.limits.max_connections} (CIRRUS_MAX_CONNECTIONS)",
            )
            return
        if self.tls is None:
            super().connection_made(transport)
        else:
            self._start_tls(transport, self.tls)
        self._since = self.loop.time()
        self._arm_timer()

    def _start_tls(self, transport: asyncio.Transport, context: ssl.SSLContext) -> None:
        """Put the loop's TLS layer between `transport` and this protocol, as the loop does for
        `create_server(ssl=...)`, but from the accept on: the connection counts from now, and the
        timer bounds the handshake as part of the first head (it closes `transport`; the layer's
        own handshake timeout is only a backstop). The layer calls `connection_made` again, with
        the TLS transport, once the handshake is done."""
        self.transport = transport
        self.connections.add(self)
        self._handshaking = True
        ended = self.loop.create_future()
        ended.add_done_callback(self._handshake_ended)
        layer = _tls_layer(self.loop)(
            self.loop,
            self,
            context,
            ended,
            server_side=True,
            ssl_handshake_timeout=self.limits.header_timeout_s + LINGER_S,
        )
        transport.set_protocol(layer)
        layer.connection_made(transport)

    def _handshake_ended(self, ended: asyncio.Future[None]) -> None:
        if not self._handshaking:
            return  # it succeeded: the layer called connection_made, and calls connection_lost in the end
        self._handshaking = False
        exc = None if ended.cancelled() else ended.exception()
        if isinstance(exc, ssl.SSLError):
            peer, why = _peer(self.transport), exc.reason or exc
            self.edge_log.event("tls", f"closed a connection from {peer}: its TLS handshake failed ({why})")
        self.connection_lost(None)  # the layer does not call it for a connection that never got past its handshake

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._lingering = True
        super().connection_lost(exc)

    # --- reading -----------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            self._linger_left -= len(data)
            if self._linger_left <= 0 and not self.transport.is_closing():
                self.transport.close()
            return
        self._unset_keepalive_if_required()
        if self._head_open:
            if self._since is None:
                self._since = self.loop.time()
                if self._timer is None or self._uneven_waits:
                    self._arm_timer()
            room = self._max_head - self._head_bytes
            if len(data) > room:
                self._past_room(data, room)
                return
            self._head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._upgrade()
        except httptools.HttpParserError:
            self._bad_request()

    def _past_room(self, data: bytes, room: int) -> None:
        """Only what fits is parsed: a head must end within it (or another head must have: then the
        open one began there and gets what is left of a fresh allowance, so a head never gets more
        than two)."""
        heads = self._heads
        self._head_bytes += room
        try:
            self.parser.feed_data(data[:room])
        except httptools.HttpParserUpgrade:
            self._upgrade()
            return
        except httptools.HttpParserError:
            self._bad_request()
            return
        if self._head_open:
            if self._heads == heads:
                if len(self.url) > self._max_url:
                    self._refuse(414, f"a URL over {self._max_url} bytes")
                else:
                    self._refuse(431, f"a request head over {self._max_head} bytes")
                return
            self._head_bytes = 0
        self.data_received(data[room:])

    def _upgrade(self) -> None:
        if self._should_upgrade():
            self.handle_websocket_upgrade()
        else:
            self._unsupported_upgrade_warning()

    def _bad_request(self) -> None:
        if self._refusal is not None and self._refusal != 400:
            status = self._refusal
            what = f"a URL over {self._max_url} bytes" if status == 414 else f"over {self._max_headers} headers"
            self._refuse(status, what)
            return
        self.edge_log.event("malformed", f"answered 400 to a malformed request from {_peer(self.transport)}")
        self.send_400_response("Invalid HTTP request received.")
        self._lingering = True

    # --- parser callbacks (the hot path) -------------------------------------------------------

    def on_headers_complete(self) -> None:
        if len(self.url) > self._max_url or len(self.headers) > self._max_headers:
            self._refusal = 414 if len(self.url) > self._max_url else 431
            raise _Refused
        if self.parser.get_http_version() == "0.9":  # a request line without a version: not HTTP/1.x
            self._refusal = 400
            raise _Refused
        self._head_open = False
        self._head_bytes = 0
        self._heads += 1
        self._since = self.loop.time()  # the body's wait begins (a message without one ends it at once)
        if self._uneven_waits:
            self._arm_timer()
        HttpToolsProtocol.on_headers_complete(self)

    def on_body(self, body: bytes) -> None:
        self._since = self.loop.time()
        HttpToolsProtocol.on_body(self, body)

    def on_message_complete(self) -> None:
        self._head_open = True
        self._since = None
        HttpToolsProtocol.on_message_complete(self)

    # --- refusing --------------------------------------------------------------------------------

    def _refuse(self, status: int, what: str) -> None:
        """Answer `status` and close: at once when a response is under way on this connection (it
        finishes first and the connection closes after it), else after lingering a moment."""
        self.edge_log.event(str(status), f"answered {status} to {what} from {_peer(self.transport)}")
        self._lingering = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.keep_alive = False  # the response in progress ends the connection
            return
        self._answer_and_linger(status)

    def _answer_and_linger(self, status: int) -> None:
        """Answer `status` (with `Connection: close`), then read and drop what the client still sends
        for a moment, so that it reads the answer rather than a reset, and close."""
        self._linger_left = LINGER_MAX_BYTES
        self.transport.write(RESPONSES[status])
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_S, self._close)

    def _close(self) -> None:
        if not self.transport.is_closing():
            self.transport.close()

    # --- timing out ------------------------------------------------------------------------------

    def _deadline(self) -> float:
        assert self._since is not None
        return self._since + (self.limits.header_timeout_s if self._head_open else self.limits.body_timeout_s)

    def _arm_timer(self) -> None:
        """Arm the timer for the current wait, unless it is armed to fire by its deadline already."""
        deadline = self._deadline()
        if self._timer is not None:
            if self._timer.when() <= deadline:
                return
            self._timer.cancel()
        self._timer = self.loop.call_at(deadline, self._timed_out)

    def _timed_out(self) -> None:
        self._timer = None
        if self._since is None or self._lingering or self.transport.is_closing():
            return  # the client owes nothing now: the next head's first byte re-arms the timer
        now = self.loop.time()
        if not self._head_open and self._body_waits_on_us():
            self._since = now
        if now < self._deadline():
            self._arm_timer()  # the wait that timer was for ended; this one began later
        elif self._head_open:
            self._head_timed_out()
        else:
            self._body_timed_out()

    def _body_waits_on_us(self) -> bool:
        """Whether the open body waits on this side: its request is pipelined behind another (whose
        app may read on), reading is paused (the app has not taken what came), or the client awaits
        `100 Continue`."""
        cycle = self.cycle
        awaits_continue = cycle.waiting_for_100_continue and not cycle.response_started
        return bool(self.pipeline) or self.flow.read_paused or awaits_continue

    def _head_timed_out(self) -> None:
        what = "TLS handshake" if self._handshaking else "request head"
        self.edge_log.event(
            "timeout",
            f"closed a connection from {_peer(self.transport)}: its {what} was not complete "
            f"within {self.limits.header_timeout_s:g}s (CIRRUS_HEADER_TIMEOUT_S)",
        )
        self._lingering = True
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.keep_alive = False
            return
        if self._head_bytes:
            self.transport.write(RESPONSES[408])
        self.transport.close()

    def _body_timed_out(self) -> None:
        """408 and close; or close at once when a response has begun (the app may be waiting on the
        body to finish it). The app's `receive()` says the client went; what it sends is dropped."""
        cycle = self.cycle
        answered = not cycle.response_started
        self.edge_log.event(
            "body timeout",
            f"{'answered 408 to' if answered else 'closed'} a connection from {_peer(self.transport)}: no byte of "
            f"its request body came within {self.limits.body_timeout_s:g}s (CIRRUS_BODY_TIMEOUT_S)",
        )
        self._lingering = True
        if not cycle.response_complete:
            cycle.disconnected = True
            cycle.message_event.set()
        if answered:
            self._answer_and_linger(408)
        else:
            self.transport.close()


def _tls_layer(loop: asyncio.AbstractEventLoop) -> Callable[..., asyncio.BufferedProtocol]:
    """The TLS protocol of `loop`'s kind: uvloop's own on uvloop, else asyncio's. Both take the same
    arguments (each loop builds its own so for `create_server(ssl=...)` and `start_tls`)."""
    try:
        import uvloop
    except ImportError:
        pass
    else:
        if isinstance(loop, uvloop.Loop):
            layer: Callable[..., asyncio.BufferedProtocol] = uvloop.loop.SSLProtocol  # type: ignore[attr-defined]
            return layer
    from asyncio import sslproto

    return sslproto.SSLProtocol


def _peer(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer or "?")


def edge_protocol(server: str, limits: EdgeLimits, tls: ssl.SSLContext | None = None) -> type[EdgeProtocol]:
    """The protocol class for one server (`uvicorn.Config(http=...)`, with no `ssl` there: `tls` is
    done here): its limits, its log and its TLS."""
    return type(
        "EdgeProtocol",
        (EdgeProtocol,),
        {"limits": limits, "edge_log": EdgeLog(server), "tls": tls, "__module__": __name__},
    )


def raise_open_files_limit() -> int:
    """Raise this process's soft limit on open descriptors to its hard limit; the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open files limit from %d to %d: %s", soft, target, exc)
    return soft
