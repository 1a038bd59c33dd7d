"""Slow and idle clients against `consumers-graphql serve`, over real sockets: each phase of
a connection has its deadline, the connection cap refuses at once what is over it, and a
stop (SIGINT as SIGTERM) ends within the grace period.

Timings are bounded both ways without racing the server: a deadline cannot fire early, and
the upper bounds are the deadline plus a wide margin."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.processes import Served

TIMEOUT_S = 1.0
MAX_CONNECTIONS = 5
MARGIN_S = 10.0
HEAD = b"GET /healthz HTTP/1.1\r\nHost: test\r\n"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    directory = tmp_path_factory.mktemp("slow")
    served = Served(f"sqlite+aiosqlite:///{directory / 'slow.db'}", directory, env={
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
    assert closed - opened >= TIMEOUT_S


def test_a_client_that_stalls_in_its_body_gets_408_and_is_closed(served: Served) -> None:
    with _connect(served) as sock:
        sent = time.monotonic()  # before the server's clock starts (it may read the bytes
        # before this thread runs again)
        sock.sendall(b"POST /graphql HTTP/1.1\r\nHost: test\r\nContent-Type: application/json"
                     b"\r\nContent-Length: 100\r\n\r\n{\"query\":")
        received, closed = _until_closed(sock)
    assert received.startswith(b"HTTP/1.1 408 "), received
    assert closed - sent >= TIMEOUT_S


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
    assert closed - idle >= TIMEOUT_S


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
    def counted() -> bool:
        now = _timeouts_counted(served)
        return all(after - earlier >= 2 for after, earlier in zip(now, before, strict=True))

    _wait_for(counted)
    after = _timeouts_counted(served)
    assert [a - b for a, b in zip(after, before, strict=True)] == [2, 2, 2]
    lines = [line for line in served.lines if '" 408 ' in line][-2:]
    assert any('"POST /graphql HTTP/1.1" 408 ' in line for line in lines), lines
    assert any('"- - HTTP/1.1" 408 ' in line and "refused=REQUEST_TIMEOUT" in line
               for line in lines), lines
    assert "jo.slow" not in served.output
