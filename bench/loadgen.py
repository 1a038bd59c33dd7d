"""A small HTTP/1.1 keep-alive load generator on raw asyncio streams, loopback only.

Reads a JSON job on stdin; writes one JSON line: requests, errors, requests/s, p50/p99 (ms).
``concurrency`` connections each send a request, read the whole response, and send the
next, until ``seconds`` have passed or ``max_requests`` were sent (after ``warmup_seconds``
not counted). Bodies are taken in turn from ``bodies`` (W5 needs a fresh one per request;
with ``unique_bodies`` each is sent once at most).
"""

from __future__ import annotations

import asyncio
import base64
import json
import sys
import time
from typing import Any

LOOPBACK = {"127.0.0.1", "::1", "localhost"}


class Stop(Exception):
    pass


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length = None
    chunked = False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value.strip())
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    if chunked:
        parts = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                break
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)
        return status, b"".join(parts)
    return status, await reader.readexactly(length or 0)


async def run(job: dict[str, Any]) -> dict[str, Any]:
    host, port = job["host"], job["port"]
    if host not in LOOPBACK:
        raise SystemExit(f"refusing to send load to {host}: loopback only")
    bodies = [base64.b64decode(b) for b in job["bodies"]]
    head = (
        f"POST {job['path']} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        + "".join(f"{k}: {v}\r\n" for k, v in job["headers"].items())
    ).encode()
    requests = [head + f"Content-Length: {len(b)}\r\n\r\n".encode() + b for b in bodies]
    unique = job.get("unique_bodies", False)
    expect = job.get("expect", "").encode()  # a response without it counts as an error
    max_requests = job["max_requests"]
    latencies: list[float] = []
    errors: list[str] = []
    sent = 0
    warm_until = time.perf_counter() + job["warmup_seconds"]
    deadline = warm_until + job["seconds"]
    measured_from: list[float] = []

    def next_request() -> bytes:
        nonlocal sent
        now = time.perf_counter()
        if now >= deadline or sent >= max_requests:
            raise Stop
        if unique and sent >= len(requests):
            raise Stop
        request = requests[sent % len(requests)]
        sent += 1
        return request

    async def connection() -> None:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while True:
                try:
                    request = next_request()
                except Stop:
                    return
                started = time.perf_counter()
                writer.write(request)
                status, body = await _read_response(reader)
                ended = time.perf_counter()
                if status != 200 or b'"errors":' in body or expect not in body:
                    errors.append(f"{status}: {body[:300]!r}")
                if started >= warm_until:
                    if not measured_from:
                        measured_from.append(started)
                    latencies.append(ended - started)
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(connection() for _ in range(job["concurrency"])))
    ended = time.perf_counter()
    window = ended - (measured_from[0] if measured_from else started)
    latencies.sort()

    def pct(p: float) -> float | None:
        if not latencies:
            return None
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000

    return {
        "requests": len(latencies), "errors": len(errors), "first_error": errors[:1],
        "rps": len(latencies) / window if window > 0 and latencies else 0.0,
        "p50_ms": pct(0.50), "p99_ms": pct(0.99),
        "seconds": window, "concurrency": job["concurrency"],
    }


def main() -> None:
    job = json.loads(sys.stdin.read())
    print(json.dumps(asyncio.run(run(job))), flush=True)


if __name__ == "__main__":
    main()
