"""Slow and idle clients against `consumers-graphql serve`, over real sockets: each phase of
a connection has its deadline, the connection cap refuses at once what is over it, and a
stop (SIGINT as SIGTERM) ends within the grace period. Each test runs on both of the
server's HTTP/1.1 protocols (CONSUMERS_HTTP_PROTOCOL: httptools, the default, and h11).

Timings are bounded both ways without racing the server: a deadline cannot fire early (but
for EARLY_S: the event loop's clock, libuv's under uvloop, counts whole milliseconds and is
read once per loop iteration, so its timer may fire a fraction of a millisecond before this
process's finer clock says the deadline is due; CI saw 0.9998 s for 1 s), and the upper
bounds are the deadline plus a wide margin."""

from __future__ import annotations

import json
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import httpx
import pytest

from tests.processes import Served

TIMEOUT_S = 1.0
EARLY_S = 0.005  # the loop clock's granularity, with room (see above)
MAX_CONNECTIONS = 5
MARGIN_S = 10.0
HEAD = b"GET /healthz HTTP/1.1\r\nHost: test\r\n"


@pytest.fixture(scope="module", params=["httptools", "h11"])
def served(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[Served]:
    yield from _serve(request.param, tmp_path_factory.mktemp("slow"))


@pytest.fixture(params=["httptools", "h11"])
def fresh(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Served, Path]]:
    """A server of its own, and its SQLite file: that no request before left the database
    in use (a test locks it)."""
    for served in _serve(request.param, tmp_path):
        yield served, tmp_path / "slow.db"


def _serve(http: str, directory: Path) -> Iterator[Served]:
    served = Served(f"sqlite+aiosqlite:///{directory / 'slow.db'}", directory, env={
        "CONSUMERS_HTTP_PROTOCOL": http,
        "CONSUMERS_KEEP_ALIVE_TIMEOUT_S": str(TIMEOUT_S),
        "CONSUMERS_HEADER_TIMEOUT_S": str(TIMEOUT_S),
        "CONSUMERS_BODY_TIMEOUT_S": str(TIMEOUT_S),
        "CONSUMERS_MAX_CONNECTIONS": str(MAX_CONNECTIONS),
    })
    try:
        served.wait_until_up()
        # wait_until_up's own connection, idle, is closed after the idle timeout
        _wait_for(lambda: _healthz(served) == 200)
        yield served
    finally:
        assert served.stop() == 0, served.output
    assert "Traceback" not in served.output, served.output


def _connect(served: Served) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", served.port), timeout=MARGIN_S)
    sock.settimeout(0.2)
    return sock


def _healthz(served: Served) -> int:
    try:
        return httpx.get(served.url + "/healthz", timeout=MARGIN_S).status_code
    except httpx.TransportError:
        return 0


def _wait_for(condition: object) -> None:
    deadline = time.monotonic() + MARGIN_S
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise AssertionError("not within the margin")


def _until_closed(sock: socket.socket, *, trickle: bytes = b"") -> tuple[bytes, float]:
    """Everything the server sends until it closes, and when it closed (monotonic); sends
    `trickle` a byte at a time meanwhile."""
    received, deadline = b"", time.monotonic() + MARGIN_S
    while time.monotonic() < deadline:
        if trickle:
            try:
                sock.sendall(trickle[:1])
            except OSError:  # closed by the server
                return received, time.monotonic()
            trickle = trickle[1:]
        try:
            chunk = sock.recv(4096)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return received, time.monotonic()
        if not chunk:
            return received, time.monotonic()
        received += chunk
    raise AssertionError(f"still open after {MARGIN_S} s; received {received!r}")


def test_a_client_that_never_completes_its_request_head_gets_408_and_is_closed(
    served: Served,
) -> None:
    with _connect(served) as sock:
        opened = time.monotonic()  # the head's deadline runs from its first byte
        sock.sendall(HEAD)
        # a header line a byte at a time, as long as the server listens
        received, closed = _until_closed(sock, trickle=b"X-Slow: " + b"a" * 1_000)
    assert received.startswith(b"HTTP/1.1 408 "), received
    assert closed - opened >= TIMEOUT_S - EARLY_S


def test_a_client_that_stalls_in_its_body_gets_408_and_is_closed(served: Served) -> None:
    with _connect(served) as sock:
        sent = time.monotonic()  # before the server's clock starts (it may read the bytes
        # before this thread runs again)
        sock.sendall(b"POST /graphql HTTP/1.1\r\nHost: test\r\nContent-Type: application/json"
                     b"\r\nContent-Length: 100\r\n\r\n{\"query\":")
        received, closed = _until_closed(sock)
    assert received.startswith(b"HTTP/1.1 408 "), received
    assert closed - sent >= TIMEOUT_S - EARLY_S


@pytest.mark.parametrize("requests", [0, 1], ids=["new", "kept-alive"])
def test_an_idle_connection_is_closed(served: Served, requests: int) -> None:
    idle = time.monotonic()  # before the server's clock starts: at the connection, or
    with _connect(served) as sock:
        for _ in range(requests):
            idle = time.monotonic()  # at the request (its response ends the wait)
            sock.sendall(HEAD + b"\r\n")
            sock.settimeout(MARGIN_S)
            response = b""
            while not response.endswith(b'{"status":"ok"}'):  # the whole response
                chunk = sock.recv(4096)
                assert chunk, response
                response += chunk
            assert response.startswith(b"HTTP/1.1 200 ")
            sock.settimeout(0.2)
        received, closed = _until_closed(sock)
    assert received == b""  # nothing was asked, nothing is answered
    assert closed - idle >= TIMEOUT_S - EARLY_S


def test_over_the_cap_a_connection_is_refused_at_once_and_served_again_later(
    served: Served,
) -> None:
    # given as many slow clients as the cap allows, each in the middle of its request head
    slow = [_connect(served) for _ in range(MAX_CONNECTIONS)]
    try:
        for sock in slow:
            sock.sendall(HEAD)
        # when one more client comes, then it gets 503 and is closed (the slow ones still
        # held every place: otherwise it would have been let in)
        with _connect(served) as extra:
            # a whole request with a body, sent before the answer is read: the server
            # drops it while it closes, else its reset could destroy the 503
            extra.sendall(b"POST /graphql HTTP/1.1\r\nHost: test\r\nContent-Length: 65536"
                          b"\r\n\r\n" + b" " * 65536)
            extra.settimeout(MARGIN_S)
            received = b""
            while chunk := extra.recv(4096):  # a reset (not an end) raises ConnectionResetError
                received += chunk
        assert received.startswith(b"HTTP/1.1 503 "), received
        assert b"retry-after: 1" in received.lower()
        # and once the slow clients have been timed out, clients are served again
        for sock in slow:
            assert _until_closed(sock)[0].startswith(b"HTTP/1.1 408 ")
        _wait_for(lambda: _healthz(served) == 200)
    finally:
        for sock in slow:
            sock.close()


def test_a_client_answered_before_its_body_is_in_is_closed(served: Served) -> None:
    # given a request answered 401 before its body is read (REST checks the key first)
    with _connect(served) as sock:
        sock.sendall(b"POST /api/v1/consumers HTTP/1.1\r\nHost: test\r\nContent-Type: "
                     b"application/json\r\nContent-Length: 1000000\r\n\r\n{")
        # when the client goes on sending its body a byte at a time, within the body timeout
        received, _ = _until_closed(sock, trickle=b" " * 1_000)
    # then it has its answer, and the connection was closed (not kept for a body no one reads)
    assert received.startswith(b"HTTP/1.1 401 "), received


@pytest.mark.parametrize("closing", [b"POST /api/v1/consumers HTTP/1.1\r\nConnection: close",
                                     b"POST /api/v1/consumers HTTP/1.0"],
                         ids=["connection-close", "http-1.0"])
def test_a_closing_request_answered_before_its_body_is_in_has_its_answer(
    served: Served, closing: bytes,
) -> None:
    # given a request that asks to close the connection after its answer, and is answered
    # 401 before its body is read, its client still sending a body the server will not read
    with _connect(served) as sock:
        sock.settimeout(MARGIN_S)
        # when it sends all of it (a close at once would reset the connection as it does)
        sock.sendall(closing + b"\r\nHost: test\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 16000000\r\n\r\n" + b" " * 16_000_000)
        received = b""
        while chunk := sock.recv(4096):  # a reset (not an end) raises ConnectionResetError
            received += chunk
    # then it can, and the answer reaches it: the close lingers (RFC 9112 §9.6)
    assert received.startswith(b"HTTP/1.1 401 "), received


def test_a_client_at_an_ordinary_pace_is_served(served: Served) -> None:
    with served.client(timeout=MARGIN_S) as client:
        for _ in range(3):  # one kept-alive connection
            assert client.get("/healthz").json() == {"status": "ok"}


def _timeouts_counted(served: Served) -> tuple[float, float, int]:
    """consumers_refusals_total{code="REQUEST_TIMEOUT"}, the 408s among the requests, and the
    408 access lines so far."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(served.url + "/metrics", timeout=MARGIN_S).text
    samples = [sample for family in text_string_to_metric_families(text)
               for sample in family.samples]
    refusals = sum(s.value for s in samples if s.name == "consumers_refusals_total"
                   and s.labels == {"code": "REQUEST_TIMEOUT"})
    answered = sum(s.value for s in samples if s.name == "consumers_http_requests_total"
                   and s.labels.get("status") == "408")
    return refusals, answered, sum('" 408 ' in line for line in served.lines)


def _increments(measure: Callable[[], Sequence[float]], before: Sequence[float],
                at_least: int) -> list[float]:
    """How much each of `measure`'s numbers grew since `before`, once each grew by at least
    `at_least` (the server counts and logs after it answers)."""
    _wait_for(lambda: all(now - then >= at_least
                          for now, then in zip(measure(), before, strict=True)))
    return [now - then for now, then in zip(measure(), before, strict=True)]


def test_the_408s_of_slow_clients_are_counted_and_logged(served: Served) -> None:
    before = _timeouts_counted(served)
    # given a client that stalls in its request head, and one that stalls in its body
    with _connect(served) as head, _connect(served) as body:
        head.sendall(b"GET /api/v1/consumers/jo.slow@example.com HTTP/1.1\r\n")
        body.sendall(b"POST /graphql HTTP/1.1\r\nHost: test\r\nContent-Type: application/json"
                     b"\r\nContent-Length: 100\r\n\r\n{\"query\":")
        assert _until_closed(head)[0].startswith(b"HTTP/1.1 408 ")
        assert _until_closed(body)[0].startswith(b"HTTP/1.1 408 ")

    # then both are refusals under REQUEST_TIMEOUT, 408s, with an access line each
    assert _increments(lambda: _timeouts_counted(served), before, 2) == [2, 2, 2]
    lines = [line for line in served.lines if '" 408 ' in line][-2:]
    assert any('"POST /graphql HTTP/1.1" 408 ' in line for line in lines), lines
    assert any('"- - HTTP/1.1" 408 ' in line and "refused=REQUEST_TIMEOUT" in line
               for line in lines), lines
    assert "jo.slow" not in served.output


def _bad_requests_counted(served: Served) -> tuple[float, int]:
    """The 400s among the requests, and the 400 access lines so far."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(served.url + "/metrics", timeout=MARGIN_S).text
    answered = sum(sample.value for family in text_string_to_metric_families(text)
                   for sample in family.samples
                   if sample.name == "consumers_http_requests_total"
                   and sample.labels.get("status") == "400")
    return answered, sum('" 400 ' in line for line in served.lines)


def test_the_400s_of_the_connection_are_counted_and_logged(served: Served) -> None:
    before = _bad_requests_counted(served)
    # given a malformed request head, and a request whose chunked body is malformed
    with _connect(served) as head, _connect(served) as body:
        head.sendall(b"GET / HTTP/1.1\r\nBad Header\r\n\r\n")
        body.sendall(_graphql_head(served, b"Transfer-Encoding: chunked") + b"zz\r\n")
        assert _until_closed(head)[0].startswith(b"HTTP/1.1 400 ")
        assert _until_closed(body)[0].startswith(b"HTTP/1.1 400 ")

    # then both are 400s, with an access line each
    assert _increments(lambda: _bad_requests_counted(served), before, 2) == [2, 2]
    lines = [line for line in served.lines if '" 400 ' in line][-2:]
    assert any('"POST /graphql HTTP/1.1" 400 ' in line for line in lines), lines
    assert any('"- - HTTP/1.1" 400 ' in line for line in lines), lines


def _responses(sock: socket.socket, count: int) -> list[tuple[int, bytes]]:
    """The next `count` responses (status, body; each with a Content-Length) on `sock`."""
    sock.settimeout(MARGIN_S)
    buffer, found = b"", []
    while len(found) < count:
        head_end = buffer.find(b"\r\n\r\n")
        if head_end >= 0:
            head = buffer[:head_end].decode("latin-1").split("\r\n")
            fields = dict(line.lower().split(": ", 1) for line in head[1:])
            end = head_end + 4 + int(fields.get("content-length", "0"))
            if len(buffer) >= end:
                found.append((int(head[0].split()[1]), buffer[head_end + 4:end]))
                buffer = buffer[end:]
                continue
        chunk = sock.recv(65536)
        assert chunk, (found, buffer)
        buffer += chunk
    sock.settimeout(0.2)
    assert buffer == b"", buffer
    return found


def _graphql_head(served: Served, *fields: bytes) -> bytes:
    return b"\r\n".join([b"POST /graphql HTTP/1.1", b"Host: test",
                         b"Content-Type: application/json",
                         b"Authorization: Bearer " + served.secret().encode(), *fields,
                         b"\r\n"])


TYPENAME = b'{"query":"{ __typename }"}'


def _typename(body: bytes) -> bool:
    return bool(json.loads(body)["data"] == {"__typename": "Query"})


def test_pipelined_requests_are_answered_in_order_then_the_connection_idles_out(
    served: Served,
) -> None:
    # given three requests sent at once, the second with a body
    with _connect(served) as sock:
        sock.sendall(HEAD + b"\r\n"
                     + _graphql_head(served, b"Content-Length: %d" % len(TYPENAME)) + TYPENAME
                     + b"GET /livez HTTP/1.1\r\nHost: test\r\n\r\n")
        answers = _responses(sock, 3)
        idle = time.monotonic()
        received, closed = _until_closed(sock)
    # then each is answered, in order, on the one connection, which is closed once idle
    assert [status for status, _ in answers] == [200, 200, 200], answers
    assert answers[0][1] == b'{"status":"ok"}'
    assert _typename(answers[1][1])
    assert received == b""
    assert closed - idle >= TIMEOUT_S - 0.2  # its clock ran from the last answer


def test_a_pipelined_request_that_never_completes_its_head_gets_408_after_the_answers(
    served: Served,
) -> None:
    with _connect(served) as sock:
        sent = time.monotonic()
        sock.sendall(HEAD + b"\r\n" + HEAD + b"\r\n" + HEAD)  # the third head never ends
        received, closed = _until_closed(sock)
    assert received.count(b"HTTP/1.1 200 ") == 2, received
    assert received.endswith(b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\n"
                             b"connection: close\r\n\r\n"), received
    assert closed - sent >= TIMEOUT_S - EARLY_S


@pytest.mark.parametrize("stall", [False, True], ids=["whole", "stalled"])
def test_a_chunked_body_is_read_and_a_stalled_one_gets_408(served: Served,
                                                           stall: bool) -> None:
    chunks = [TYPENAME[:5], TYPENAME[5:]]
    with _connect(served) as sock:
        sent = time.monotonic()
        sock.sendall(_graphql_head(served, b"Transfer-Encoding: chunked")
                     + b"%x\r\n%s\r\n" % (len(chunks[0]), chunks[0]))
        if stall:  # the rest of the body never comes
            received, closed = _until_closed(sock)
            assert received.startswith(b"HTTP/1.1 408 "), received
            assert closed - sent >= TIMEOUT_S - EARLY_S
            return
        time.sleep(TIMEOUT_S / 2)  # less than the body timeout between two reads
        sock.sendall(b"%x\r\n%s\r\n0\r\n\r\n" % (len(chunks[1]), chunks[1]))
        [(status, body)] = _responses(sock, 1)
        assert status == 200 and _typename(body), body
        # and the connection is kept for the next request
        sock.sendall(HEAD + b"\r\n")
        assert _responses(sock, 1) == [(200, b'{"status":"ok"}')]


def test_expect_100_continue_is_answered_when_the_body_is_read(served: Served) -> None:
    with _connect(served) as sock:
        sock.sendall(_graphql_head(served, b"Content-Length: %d" % len(TYPENAME),
                                   b"Expect: 100-continue"))
        sock.settimeout(MARGIN_S)
        interim = sock.recv(4096)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n", interim
        sock.sendall(TYPENAME)
        [(status, body)] = _responses(sock, 1)
        assert status == 200 and _typename(body), body


def test_a_malformed_body_sent_without_waiting_for_the_100_is_refused_without_an_error(
    served: Served,
) -> None:
    refused_before = sum('" 400 ' in line for line in served.lines)
    # given a client that asks for 100 Continue but sends a broken chunked body at once
    with _connect(served) as sock:
        sock.sendall(_graphql_head(served, b"Expect: 100-continue",
                                   b"Transfer-Encoding: chunked") + b"zz\r\n")
        # then it gets its 400 and the close, and no 100 Continue after them
        answer, _ = _until_closed(sock)
        assert answer.startswith(b"HTTP/1.1 400 "), answer
        assert b"100 Continue" not in answer, answer
    # and the application, whose read of the body meets a closing connection, logs no error
    _wait_for(lambda: sum('" 400 ' in line for line in served.lines) > refused_before)
    assert "Traceback" not in served.output and "unhandled error" not in served.output


def test_a_client_expecting_100_continue_has_a_whole_body_timeout_after_the_100(
    fresh: tuple[Served, Path],
) -> None:
    served, database_file = fresh
    # given a request with Expect: 100-continue whose body the application asks for late
    # (REST checks the key first, and waits on the database, locked meanwhile): after the
    # body timeout has run out once while nothing was asked, shortly before its next end
    locked, release = threading.Event(), threading.Event()

    def lock() -> None:
        database = sqlite3.connect(database_file, isolation_level=None)
        try:
            database.execute("PRAGMA locking_mode=EXCLUSIVE")
            database.execute("BEGIN EXCLUSIVE")
            locked.set()
            release.wait(MARGIN_S)
            database.execute("COMMIT")
        finally:
            database.close()

    locker = threading.Thread(target=lock)
    locker.start()
    try:
        assert locked.wait(MARGIN_S)
        with _connect(served) as sock:
            sock.sendall(b"POST /api/v1/consumers HTTP/1.1\r\nHost: test\r\nContent-Type: "
                         b"application/json\r\nAuthorization: Bearer %s\r\nContent-Length: 2"
                         b"\r\nExpect: 100-continue\r\n\r\n" % served.secret().encode())
            time.sleep(TIMEOUT_S * 1.8)
            release.set()
            sock.settimeout(MARGIN_S)
            interim = sock.recv(4096)
            assert interim == b"HTTP/1.1 100 Continue\r\n\r\n", interim
            # when the client sends its body within the body timeout of the 100
            time.sleep(TIMEOUT_S / 2)
            sock.sendall(b"{}")
            # then it is read and answered
            [(status, body)] = _responses(sock, 1)
    finally:
        release.set()
        locker.join()
    assert status == 201, body


def test_a_client_expecting_100_continue_answered_without_its_body_is_closed(
    served: Served,
) -> None:
    # given a request with Expect: 100-continue that is refused before its body is read
    with _connect(served) as sock:
        sock.sendall(b"POST /api/v1/consumers HTTP/1.1\r\nHost: test\r\nContent-Type: "
                     b"application/json\r\nContent-Length: 1000000\r\n"
                     b"Expect: 100-continue\r\n\r\n")
        received, _ = _until_closed(sock)
    # then the client is told no without a 100 Continue, and the connection closed
    assert received.startswith(b"HTTP/1.1 401 "), received


def test_serve_runs_on_uvloop_unless_h11_is_asked_for(
    served: Served, request: pytest.FixtureRequest,
) -> None:
    """httptools' protocol on uvloop by default; h11's on asyncio's own loop when asked for
    (the tests above are what says which protocol answered: they pass on both)."""
    maps = Path(f"/proc/{served.process.pid}/maps")
    if not maps.exists():
        pytest.skip("no /proc to read the server's loaded libraries from")
    uvloop = "/uvloop/loop." in maps.read_text()
    assert uvloop is (request.node.callspec.params["served"] == "httptools")


@pytest.mark.parametrize("reads", [1, 2])
def test_a_request_head_over_16_kib_gets_400_at_once(served: Served, reads: int) -> None:
    # given a client whose request head goes on past 16 KiB (its memory is the server's)
    with _connect(served) as sock:
        sent = time.monotonic()
        if reads == 2:  # the server reads the head's beginning first
            sock.sendall(HEAD + b"X-Big: ")
            time.sleep(0.1)
        sock.sendall((b"" if reads == 2 else HEAD + b"X-Big: ") + b"a" * 20_000)
        received, closed = _until_closed(sock)
    # then it is refused as soon as it is over, not at the head's deadline
    assert received.startswith(b"HTTP/1.1 400 "), received
    assert closed - sent < TIMEOUT_S


@pytest.mark.parametrize("refused", [HEAD + b"X-Big: " + b"a" * 16_000_000,
                                     b"GET / HTTP/1.1\r\nBad Header\r\n\r\n" + b" " * 16_000_000],
                         ids=["over-16-kib", "malformed"])
def test_a_client_refused_400_while_it_still_sends_has_its_answer(
    served: Served, refused: bytes,
) -> None:
    with _connect(served) as sock:
        sock.settimeout(MARGIN_S)
        # when it sends all it has (a close at once would reset the connection as it does)
        sock.sendall(refused)
        received = b""
        while chunk := sock.recv(4096):  # a reset (not an end) raises ConnectionResetError
            received += chunk
    # then it can, and the 400 reaches it: the close lingers (RFC 9112 §9.6)
    assert received.startswith(b"HTTP/1.1 400 "), received


def test_a_request_head_under_16_kib_is_served(served: Served) -> None:
    with _connect(served) as sock:
        sock.sendall(HEAD + b"X-Big: " + b"a" * 12_000 + b"\r\n\r\n")
        assert _responses(sock, 1) == [(200, b'{"status":"ok"}')]


def test_trailer_fields_over_16_kib_get_400_at_once(served: Served) -> None:
    # given a chunked body whose last chunk is followed by trailer fields past 16 KiB (kept
    # by the server, as a head's are, they would be its memory)
    with _connect(served) as sock:
        sock.sendall(_graphql_head(served, b"Transfer-Encoding: chunked")
                     + b"%x\r\n%s\r\n0\r\n" % (len(TYPENAME), TYPENAME))
        try:
            for _ in range(100):  # 1 MB, faster than any deadline
                sock.sendall((b"X-Trailer: " + b"a" * 1_000 + b"\r\n") * 10)
            sock.sendall(b"\r\n")
        except OSError:  # closed by the server
            pass
        received, _ = _until_closed(sock)
    # then it is refused as a head over the limit is, and the request is not answered
    assert received.startswith(b"HTTP/1.1 400 "), received[:200]
    assert b"HTTP/1.1 200 " not in received


def test_a_chunk_extension_over_16_kib_gets_400_at_once(served: Served) -> None:
    # given a chunk-size line whose extension goes on past 16 KiB (no chunk data ever comes:
    # the body timeout, restarted by every read, would never end it)
    with _connect(served) as sock:
        sock.sendall(_graphql_head(served, b"Transfer-Encoding: chunked") + b"1a;x=")
        try:
            for _ in range(100):  # 1 MB, faster than any deadline
                sock.sendall(b"a" * 10_000)
        except OSError:  # closed by the server
            pass
        received, _ = _until_closed(sock)
    # then it is refused as a head over the limit is
    assert received.startswith(b"HTTP/1.1 400 "), received[:200]


@pytest.mark.parametrize("broken", [b"GET / HTTP/1.1\r\nBad Header\r\n\r\n",
                                    b"POST /graphql HTTP/1.1\r\nHost: test\r\n"
                                    b"Transfer-Encoding: chunked\r\n\r\nzz\r\n"],
                         ids=["head", "body"])
def test_a_broken_pipelined_request_is_answered_400_after_the_requests_before_it(
    served: Served, broken: bytes,
) -> None:
    # given a request, and a broken one after it in the same write (read together)
    with _connect(served) as sock:
        sock.sendall(_graphql_head(served, b"Content-Length: %d" % len(TYPENAME)) + TYPENAME
                     + broken)
        answers = _responses(sock, 2)
        received, _ = _until_closed(sock)
    # then the first is answered, then the broken one is refused and the connection closed
    assert [status for status, _ in answers] == [200, 400], answers
    assert _typename(answers[0][1])
    assert received == b""


def test_a_pipelined_head_over_16_kib_gets_400_at_once(served: Served) -> None:
    # given a head past the limit that begins in the read that ends the request before it
    with _connect(served) as sock:
        sent = time.monotonic()
        sock.sendall(HEAD + b"\r\n" + HEAD + b"X-Big: " + b"a" * 70_000)
        answers = _responses(sock, 2)
        received, closed = _until_closed(sock)
    # then the first is answered, and the second refused as soon as it is over the limit
    assert [status for status, _ in answers] == [200, 400], answers
    assert received == b""
    assert closed - sent < TIMEOUT_S + 0.5


def test_an_answer_of_known_length_is_written_at_once(tmp_path: Path) -> None:
    """uvicorn's httptools protocol writes an answer's head when the application starts it
    and its body after: two system calls, two packets. Counted on the server's process in
    /proc/PID/io (uvloop writes to a socket with write(2); its access log is quiet here)."""
    served = Served(f"sqlite+aiosqlite:///{tmp_path / 'writes.db'}", tmp_path,
                    env={"CONSUMERS_LOG_LEVEL": "warning"})
    live = b"GET /livez HTTP/1.1\r\nHost: test\r\n\r\n"  # answered without any I/O
    try:
        served.wait_until_up()
        # given a kept-alive connection that has been answered once
        with _connect(served) as sock:
            sock.sendall(live)
            [(status, body)] = _responses(sock, 1)
            assert status == 200, body
            before = _writes(served)
            # when it asks 50 times more, one request at a time
            for _ in range(50):
                sock.sendall(live)
                assert _responses(sock, 1) == [(200, body)]
            writes = _writes(served) - before
            # and a large answer (a file, read and sent 64 KiB at a time) comes whole, its
            # head written with its first part or alone, without copying a large body
            sock.sendall(b"GET /docs/assets/swagger-ui-bundle.js HTTP/1.1\r\nHost: test\r\n\r\n")
            [(status, script)] = _responses(sock, 1)
            sock.sendall(live)
            assert _responses(sock, 1) == [(200, body)]
    finally:
        assert served.stop() == 0, served.output
    # then each answer, head and body, took one write
    assert writes == 50, writes
    assert status == 200 and len(script) > 512 * 1024, (status, len(script))


def _writes(served: Served) -> int:
    """Write system calls the server process has made (/proc/PID/io: all its threads)."""
    io = Path(f"/proc/{served.process.pid}/io").read_text()
    return int(next(line for line in io.splitlines() if line.startswith("syscw:")).split()[1])


def test_a_head_request_is_answered_without_a_body_to_wait_for(served: Served) -> None:
    with _connect(served) as sock:
        sock.sendall(b"HEAD /healthz HTTP/1.1\r\nHost: test\r\n\r\n" + HEAD + b"\r\n")
        sock.settimeout(MARGIN_S)
        received = b""
        while received.count(b"\r\n\r\n") < 2 or not received.endswith(b'{"status":"ok"}'):
            chunk = sock.recv(4096)
            assert chunk, received
            received += chunk
    head, second = received.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200 ") and b"content-length: 15" in head.lower(), head
    assert second.startswith(b"HTTP/1.1 200 "), second
