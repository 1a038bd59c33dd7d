"""Slow and idle clients, for `serve`: uvicorn's HTTP/1.1 protocol (httptools, or h11 with
CONSUMERS_HTTP_PROTOCOL=h11) with deadlines for every phase of a connection and a cap on how
many are open.

uvicorn closes a kept-alive connection after `timeout_keep_alive`, but a connection that
never completes its request head, or sends its body a byte a minute, is kept forever: a few
hundred of them use up the process's file descriptors and lock every other client out.
Here a connection must, from the moment it opens or its last response ends,
- send the first byte of a request within the idle timeout (else it is closed),
- complete the request head within the header timeout of that first byte (408, closed),
- keep its body coming: no more than the body timeout between two reads of it (408,
  closed; never counted while the application has not asked for the body);
a connection answered before its request's body is all in (a 401, a 504) is closed: h11
cannot reuse it, httptools would read and drop the rest of the body, however slowly it
comes;
and a connection over the cap is answered 503 with Retry-After and closed at once.
A request head, or a chunked body's trailer fields, over 16 KiB, and a malformed request,
are answered 400 and the connection closed; a pipelined one, after the answers to the
requests before it.
Every close after an answer is a lingering one (RFC 9112 §9.6): the answer is sent, the
sending side shut, and what the client still sends discarded for a moment, so that a reset
does not destroy the answer before the client has read it."""

from __future__ import annotations

import asyncio
import functools
import logging
import resource
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from consumers_graphql.settings import HttpProtocol, Settings
from consumers_graphql.web import observe

logger = logging.getLogger("consumers_graphql.http")

if TYPE_CHECKING:
    from uvicorn.protocols.http.flow_control import FlowControl
    from uvicorn.server import Protocols, ServerState

_TIMED_OUT = b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
# An interim answer (`100 Continue`), written at once; and how an answer's head says its
# length (uvicorn writes header names in lower case, after the status line).
_INFORMATIONAL = b"HTTP/1.1 1"
_CONTENT_LENGTH = b"\r\ncontent-length: "
# A body joined to its head (a copy) to write both at once is smaller than this; a larger
# one (a file goes out in parts of 64 KiB) is written after the head, not copied.
_JOINED_BODY_BYTES = 64 * 1024
_FULL = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n"
         b"retry-after: 1\r\n\r\n")
# Descriptors kept for everything but clients: the database pools (two engines, each its
# size plus as many overflow connections), the listening socket, log files, SQLite's files.
_RESERVED_DESCRIPTORS = 64
# uvicorn's listen backlog, the most it takes when descriptors are plenty. asyncio accepts up
# to the backlog's worth of connections in one go, before any is refused over the cap, so
# the cap leaves that many descriptors free: else a burst meets EMFILE (and asyncio logs a
# traceback for every connection of it).
_BACKLOG = 2048
# The most a request head may have, as uvicorn's h11 protocol allows (h11's default).
_MAX_HEAD_BYTES = 16 * 1024
# How long a closing connection still reads (and drops) what its client sends.
_LINGER_S = 1.0
# Refused connections lingering at once, at most (fewer when descriptors are scarce); the
# cap keeps their descriptors free too.
_LINGERING_REFUSALS = 64


def _disconnect(cycle: Any) -> None:
    """The application's receive() of this request now sees a disconnect, and sends no
    `100 Continue` (the connection is closing: a write after its write_eof raises); what
    the application sends is dropped."""
    cycle.waiting_for_100_continue = False
    cycle.disconnected = True
    cycle.message_event.set()


class _Wait(Enum):
    IDLE = "idle"
    HEAD = "head"
    BODY = "body"


@dataclass(frozen=True)
class ConnectionLimits:
    idle_s: float
    header_s: float
    body_s: float
    max_connections: int
    http: HttpProtocol = HttpProtocol.HTTPTOOLS
    backlog: int = _BACKLOG
    lingering_refusals: int = _LINGERING_REFUSALS

    @classmethod
    def for_settings(cls, settings: Settings) -> ConnectionLimits:
        """The settings' limits, the cap and the backlog lowered to what the descriptor limit
        allows."""
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        cap, backlog, lingering = settings.max_connections, _BACKLOG, _LINGERING_REFUSALS
        if soft != resource.RLIM_INFINITY:
            spare = max(2, soft - _RESERVED_DESCRIPTORS - 4 * settings.pool_size)
            backlog = min(backlog, max(1, spare // 4))
            lingering = min(lingering, backlog)
            cap = min(cap, max(1, spare - backlog - lingering))
        return cls(idle_s=settings.keep_alive_timeout_s, header_s=settings.header_timeout_s,
                   body_s=settings.body_timeout_s, max_connections=cap,
                   http=settings.http_protocol, backlog=backlog,
                   lingering_refusals=lingering)

    def protocol(self) -> type[asyncio.Protocol]:
        """The class to give uvicorn as `http=`, one per process and limits: its connections
        share the counts kept on it."""
        return _protocol_class(self)

    def protocol_factory(self) -> Callable[..., asyncio.Protocol]:
        """What `serve --workers N` gives uvicorn as `http=`: uvicorn pickles its configuration
        to each worker process it spawns, and a class made at run time cannot be pickled; this
        can, and makes each connection's protocol from the worker's own class."""
        return functools.partial(_new_protocol, self)


@functools.cache
def _protocol_class(limits: ConnectionLimits) -> type[asyncio.Protocol]:
    base: type[_Limited] = (LimitedH11Protocol if limits.http is HttpProtocol.H11
                            else LimitedHttpToolsProtocol)
    return type(base.__name__, (base,), {"limits": limits})


def _new_protocol(limits: ConnectionLimits, *args: Any, **kwargs: Any) -> asyncio.Protocol:
    return _protocol_class(limits)(*args, **kwargs)


if TYPE_CHECKING:
    class _Uvicorn(asyncio.Protocol):
        """What `_Limited` uses of uvicorn's HTTP/1.1 protocols (h11's and httptools'); the
        contract is tested by tests/test_slow_clients.py, on both."""

        loop: asyncio.AbstractEventLoop
        transport: asyncio.Transport
        flow: FlowControl
        connections: set[Protocols]
        server_state: ServerState
        app_state: dict[str, Any]
        timeout_keep_alive: int  # a float works

        def __init__(self, *args: Any, **kwargs: Any) -> None: ...
        def on_response_complete(self) -> None: ...
        def _unset_keepalive_if_required(self) -> None: ...
else:
    _Uvicorn = object


class _CycleTransport:
    """The connection's transport as one request/response cycle writes to it.
    - An answer of known length (Content-Length) goes out in one write: uvicorn writes the
      head when the application starts its answer and the body when it sends it, two
      writes (two system calls and two packets) where one does. The head waits for the
      first write after it, or for a close. A HEAD request's head (no body follows) and a
      stream's (its body may wait on events) are written at once, as is a `100 Continue`.
    - A cycle that closes the connection after its answer (a `Connection: close` or
      HTTP/1.0 request; uvicorn closes in the cycle's send, before the protocol hears the
      answer is done): the close lingers when the request's body is not all in."""

    __slots__ = ("_closing", "_head", "_hold", "_protocol", "_transport")

    def __init__(self, protocol: _Limited, transport: asyncio.Transport, *, hold: bool,
                 closing: bool) -> None:
        self._protocol, self._transport = protocol, transport
        self._hold, self._closing = hold, closing
        self._head: bytes | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def write(self, data: bytes) -> None:
        head = self._head
        if head is not None:
            self._head = None
            if len(data) < _JOINED_BODY_BYTES:
                self._transport.write(b"".join((head, data)))  # any bytes-like body
                return
            self._transport.write(head)  # a large body: not copied to save a write
            self._transport.write(data)
        elif self._hold and not data.startswith(_INFORMATIONAL):
            # the answer's head (the first write but a 100 Continue): held when a body of
            # known length follows; a cycle has one head, so nothing more is held
            self._hold = False
            if _CONTENT_LENGTH in data:
                self._head = data
            else:
                self._transport.write(data)
        else:
            self._transport.write(data)

    def close(self) -> None:
        head = self._head
        if head is not None:  # the application ended the answer early, or failed
            self._head = None
            self._transport.write(head)
        protocol = self._protocol
        if (self._closing and not protocol._lingering and not self._transport.is_closing()
                and protocol.transport is self._transport
                and protocol._client_wait() is _Wait.BODY):
            protocol._close_lingering()  # answered before the body was in
        else:
            self._transport.close()


class _Limited(_Uvicorn):
    """The deadlines, the cap and the lingering closes, on either of uvicorn's protocols:
    each says what the connection waits for from its client (`_client_wait`), and which
    request the application is on (`_current`)."""

    limits: ConnectionLimits
    _full = False  # the cap was reached (logged once until connections are accepted again)
    _refusals = 0  # refused connections still lingering

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.timeout_keep_alive = self.limits.idle_s  # type: ignore[assignment]  # uvicorn says int; a float works
        self._clock: asyncio.TimerHandle | None = None
        self._waiting: _Wait | None = None
        # The clock's last expiry was put off: the application had not asked for the body
        self._deferred = False
        self._lingering = False
        self._refused = False

    def _client_wait(self) -> _Wait | None:
        """What the connection waits for from its client: None while the application has
        the request (or the next one, pipelined, waits for it)."""
        raise NotImplementedError

    def _current(self) -> Any:
        """The request/response cycle whose body is read now, if any (uvicorn's
        RequestResponseCycle, of either protocol)."""
        raise NotImplementedError

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]  # as uvicorn's own
        if len(self.connections) >= self.limits.max_connections:
            self.transport = transport
            if type(self)._refusals < self.limits.lingering_refusals:
                type(self)._refusals += 1
                self._refused = True
                self._close_lingering(_FULL)
            else:
                transport.write(_FULL)
                transport.close()
            if not type(self)._full:
                type(self)._full = True
                logger.warning("%d client connections open, the most allowed: refusing new "
                               "ones (503) until some close", self.limits.max_connections)
            return
        if type(self)._full:
            type(self)._full = False
            logger.info("accepting client connections again")
        super().connection_made(transport)
        self._watch()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_clock()
        if self._refused:
            self._refused = False
            type(self)._refusals -= 1
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return  # the connection is closing: what the client still sends is dropped
        super().data_received(data)
        self._watch(received=True)

    def on_response_complete(self) -> None:
        answered_early = self._client_wait() is _Wait.BODY
        super().on_response_complete()
        # uvicorn's keep-alive timer closes without a word, even on a connection whose next
        # request has begun (pipelined): the clocks here say when, and answer 408 for a head.
        self._unset_keepalive_if_required()
        if self._lingering:
            return  # closed after the answer (_CycleTransport)
        if answered_early and not self.transport.is_closing():
            self._close_lingering()  # answered before the body was in: nothing more to serve
            return
        self._watch()

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request its parser refuses (and to a head over the limit
        here), as a lingering close: uvicorn's own closes at once, and the client's reset
        (it is still sending) could destroy the 400. A request the application has (its
        body is what was refused) sees a disconnect; what it sends is dropped."""
        self._answer_400(msg, self._current())

    def _answer_400(self, msg: str, cycle: Any) -> None:
        """The 400, `cycle` the request the application has, if any: its access line and
        metrics say 400 (web/access_log.py); else the access log's hook logs and counts it."""
        if cycle is not None and not cycle.response_complete:
            cycle.scope[observe.MALFORMED] = True
            _disconnect(cycle)
            if cycle.response_started:
                # a 400 now would land inside the answer already begun: only the close
                self._stop_clock()
                self.transport.close()
                return
        else:
            report = self.app_state.get(observe.MALFORMED_HOOK)
            if callable(report):
                report()
        content = [b"HTTP/1.1 400 Bad Request\r\n"]
        for name, value in self.server_state.default_headers:
            content += [name, b": ", value, b"\r\n"]
        body = msg.encode("ascii")
        content.append(b"content-type: text/plain; charset=utf-8\r\ncontent-length: %d\r\n"
                       b"connection: close\r\n\r\n%s" % (len(body), body))
        self._close_lingering(b"".join(content))

    def _close_lingering(self, answer: bytes = b"") -> None:
        """Sends `answer`, shuts the sending side, then drops what comes for a moment and
        closes."""
        self._stop_clock()
        if answer:
            self.transport.write(answer)
        if not self.transport.can_write_eof():
            self.transport.close()
            return
        self.transport.write_eof()
        self._lingering = True
        # The client's own close (EOF) ends it sooner: uvicorn's eof_received lets it close.
        self._clock = self.loop.call_later(_LINGER_S, self.transport.close)

    def _watch(self, *, received: bool = False) -> None:
        """Starts the clock for what the connection now waits for from its client."""
        if self._lingering:
            return  # its clock closes it
        if self.transport.is_closing() or self.transport.get_protocol() is not self:
            self._stop_clock()  # closed, or upgraded to another protocol (a WebSocket)
            return
        waiting = self._client_wait()
        if waiting is self._waiting and not (waiting is _Wait.BODY and received):
            return  # the head's deadline runs from its first byte; the body's from each read
        self._stop_clock()
        if waiting is not None:
            self._start_clock(waiting)

    def _start_clock(self, waiting: _Wait) -> None:
        seconds = {_Wait.IDLE: self.limits.idle_s, _Wait.HEAD: self.limits.header_s,
                   _Wait.BODY: self.limits.body_s}[waiting]
        self._waiting = waiting
        self._clock = self.loop.call_later(seconds, self._expired)

    def _report_head_timeout(self) -> None:
        """No request reached the app: the access log's hook, left in the lifespan state,
        logs and counts the 408."""
        report = self.app_state.get(observe.TIMEOUT_HOOK)
        if callable(report):
            report(self.limits.header_s)

    def _stop_clock(self) -> None:
        if self._clock is not None:
            self._clock.cancel()
        self._clock, self._waiting, self._deferred = None, None, False

    def _expired(self) -> None:
        waiting = self._waiting
        self._clock, self._waiting = None, None
        if self.transport.is_closing():
            return
        cycle = self._current() if waiting is _Wait.BODY else None
        if cycle is not None and not cycle.response_complete:
            if self.flow.read_paused or cycle.waiting_for_100_continue:
                self._start_clock(_Wait.BODY)  # the application has not asked for more yet
                self._deferred = True
                return
            if self._deferred:
                # it has since (a 100 Continue may just have gone out): the client has a
                # whole body timeout from now, not what was left of the last one
                self._start_clock(_Wait.BODY)
                self._deferred = False
                return
        if waiting is _Wait.HEAD or (cycle is not None and not cycle.response_started):
            if cycle is not None:
                # The application's receive() now sees a disconnect; what it sends is dropped.
                # Its access line and metrics say 408 (web/access_log.py).
                cycle.scope[observe.TIMED_OUT] = True
                _disconnect(cycle)
            else:
                self._report_head_timeout()
            self._close_lingering(_TIMED_OUT)
            return
        self.transport.close()


class LimitedH11Protocol(_Limited, H11Protocol):
    """uvicorn's h11 protocol (pure Python) with the limits: h11 says what it waits for."""

    def _client_wait(self) -> _Wait | None:
        state = self.conn.their_state
        if state is h11.IDLE:
            return _Wait.HEAD if self.conn.trailing_data[0] else _Wait.IDLE
        if state is h11.SEND_BODY:
            return _Wait.BODY
        return None  # the request is in; the application has the connection

    def _current(self) -> Any:
        return self.cycle

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle:  # a new request (its application is yet to run)
            self.cycle.transport = _CycleTransport(  # type: ignore[assignment]  # a transport to uvicorn
                self, self.transport, hold=False, closing=True)


class LimitedHttpToolsProtocol(_Limited, HttpToolsProtocol):
    """uvicorn's httptools protocol (llhttp, in C) with the limits. Its parser reads ahead:
    the next request of a pipelining client is parsed (its head, some of its body) while
    the application works on the one before, and waits in `pipeline` (reading paused) for
    it. Deadlines for that next request start once the application is done, as with h11."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._parsing = _Wait.IDLE  # where the parser is in the client's latest request
        self._begun = self._completed = 0  # requests begun, requests read (to the end)
        self._head_bytes = 0  # of the head being read
        self._chunks_read = 0  # on_body calls, to tell data from trailers
        # A chunked body's bytes that carried no data (chunk-size lines and their
        # extensions, trailer fields), since the last that did: limited like a head
        self._trailer_bytes = 0
        self._chunked = False  # the body being read is chunked
        # A 400 owed to the client once the application has answered what came before it
        # (a pipelined request the parser failed on): reading stops, what comes is dropped
        self._owed_400: str | None = None

    def data_received(self, data: bytes) -> None:
        """Also refuses a head, or a chunked body's trailer fields, over h11's limit (llhttp
        has none: the head would grow until its deadline, the trailers forever, their fields
        kept by uvicorn), as uvicorn's h11 protocol does: 400, closed. The parser is fed at
        most the limit at a time, each slice's bytes counted for the head (or the trailers)
        in it: from the slice it began in when that slice began it, else from the next."""
        if self._owed_400 is not None:
            return  # a 400 waits for the answers before it: nothing more is read
        if len(data) <= _MAX_HEAD_BYTES:
            self._feed(data)
            return
        for start in range(0, len(data), _MAX_HEAD_BYTES):
            self._feed(data[start:start + _MAX_HEAD_BYTES])
            if (self._lingering or self._owed_400 is not None or self.transport.is_closing()
                    or self.transport.get_protocol() is not self):
                return  # refused, closing, or upgraded (uvicorn drops the rest as well)

    def _feed(self, data: bytes) -> None:
        before, begun, completed = self._parsing, self._begun, self._completed
        chunks_read = self._chunks_read
        super().data_received(data)
        if self._lingering or self._owed_400 is not None or self.transport.is_closing():
            return
        if self._parsing is _Wait.HEAD:
            if self._begun == begun:  # the same head as before this read
                self._head_bytes += len(data)
            elif before is _Wait.IDLE and self._completed == completed:  # all this head's
                self._head_bytes = len(data)
            if self._head_bytes <= _MAX_HEAD_BYTES:
                return
        elif self._parsing is _Wait.BODY and self._chunked:
            if self._chunks_read == chunks_read and self._begun == begun:
                # no chunk data in it: chunk-size lines, their extensions, trailer fields
                self._trailer_bytes += len(data)
            else:
                self._trailer_bytes = 0  # from the next read
            if self._trailer_bytes <= _MAX_HEAD_BYTES:
                return
        else:
            return
        message = "Invalid HTTP request received."
        self.logger.warning(message)
        self.send_400_response(message)

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to what its parser (or the limits here) refuse. The parser reads
        ahead: a request it fails on may follow others the application has yet to answer;
        the 400 then waits for their answers (as h11's does), and the failed request, if
        queued, is not run. A request the application has is told of the disconnect."""
        if self._parsing is _Wait.BODY and self.pipeline:
            self.pipeline.popleft()  # the latest request, queued: its body is broken
            self._owe_400(msg)
            return
        if self._parsing is not _Wait.BODY and self._busy():
            self._owe_400(msg)
            return
        super().send_400_response(msg)

    def _owe_400(self, msg: str) -> None:
        self._owed_400 = msg
        self.flow.pause_reading()
        self._stop_clock()

    def on_response_complete(self) -> None:
        next_queued = bool(self.pipeline)
        super().on_response_complete()
        if self._owed_400 is None or self.transport.is_closing():
            return
        if next_queued:
            self.flow.pause_reading()  # uvicorn resumed it for the next request
            return
        self._answer_400(self._owed_400, None)  # the application never had the request

    # The parser's callbacks (it calls them by name)
    def on_message_begin(self) -> None:  # its first byte
        self._parsing, self._head_bytes = _Wait.HEAD, 0
        self._begun += 1
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        self._parsing, self._trailer_bytes = _Wait.BODY, 0
        self._chunked = any(name == b"transfer-encoding" and b"chunked" in value.lower()
                            for name, value in self.headers)
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not None and cycle.scope is self.scope:  # a request for the application
            cycle.transport = _CycleTransport(  # type: ignore[assignment]  # a transport to uvicorn
                self, self.transport, hold=self.scope["method"] != "HEAD",
                closing=not cycle.keep_alive)

    def _close_lingering(self, answer: bytes = b"") -> None:
        self.pipeline.clear()  # nothing more is served: requests queued are not run
        super()._close_lingering(answer)

    def on_chunk_header(self) -> None:
        # Trailer fields, after the last chunk, are not the request's headers: uvicorn's
        # on_header would add them to the scope's (here to a list of their own, under the
        # limit), as uvicorn's h11 protocol does not
        if self.headers is self.scope["headers"]:
            self.headers = []

    def on_body(self, body: bytes) -> None:
        self._chunks_read += 1
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._parsing = _Wait.IDLE
        self._completed += 1
        super().on_message_complete()

    def _busy(self) -> bool:
        """The application has a request of this connection (and maybe more queued)."""
        return bool(self.pipeline) or (self.cycle is not None
                                       and not self.cycle.response_complete)

    def _client_wait(self) -> _Wait | None:
        if self._owed_400 is not None:
            return None  # nothing more is read
        if self._parsing is _Wait.BODY:
            # the latest request's body: read for the application, unless that request is
            # queued behind another (`cycle` is the latest; reading is paused then)
            return None if self.pipeline else _Wait.BODY
        return None if self._busy() else self._parsing

    def _current(self) -> Any:
        return None if self.pipeline else self.cycle
