"""`serve --workers N`'s parent process: uvicorn's process manager (`Multiprocess`), which
replaces a worker that dies or hangs, restarts them all on SIGHUP (each replacement ready
before the one it replaces stops), adds one on SIGTTIN and removes one on SIGTTOU. Here it
also tells the metrics when a worker has exited (uvicorn has no hook for that), and keeps
what stopped it: the signal, or a worker that could not start; and every worker listens on
a socket of its own (`OwnSocket`)."""

from __future__ import annotations

import signal
from collections.abc import Callable
from socket import (
    AF_INET,
    AF_INET6,
    IPPROTO_TCP,
    SO_REUSEADDR,
    SO_REUSEPORT,
    SOCK_STREAM,
    SOL_SOCKET,
    socket,
)

from uvicorn.config import STARTUP_FAILURE, Config
from uvicorn.supervisors.multiprocess import Multiprocess, Process

from consumers_graphql.web import metrics


class Workers(Multiprocess):
    def __init__(self, config: Config, sockets: list[socket]) -> None:
        super().__init__(config, sockets)
        self.stopped_by: int | None = None
        self.startup_failed = False  # a worker exited with uvicorn's start-up failure code
        self._exited: set[int] = set()

    def handle_int(self) -> None:
        self.stopped_by = signal.SIGINT
        super().handle_int()

    def handle_term(self) -> None:
        self.stopped_by = signal.SIGTERM
        super().handle_term()

    # Where workers exit: a dead or hung one is replaced, the signals (SIGHUP's restarts,
    # SIGTTOU), the final stop.
    def keep_subprocess_alive(self) -> None:
        self._reaping(super().keep_subprocess_alive)

    def handle_signals(self) -> None:
        self._reaping(super().handle_signals)

    def join_all(self) -> None:
        self._reaping(super().join_all)

    def _reaping(self, step: Callable[[], None]) -> None:
        before: list[Process] = list(self.processes)
        try:
            step()
        finally:
            for process in before:
                pid, code = process.pid, process.exitcode
                if pid is None or code is None or pid in self._exited:
                    continue
                self._exited.add(pid)
                self.startup_failed |= code == STARTUP_FAILURE
                metrics.child_exited(pid)


class OwnSocket:
    """Stands for the listening socket in the list uvicorn's Multiprocess hands every worker
    it starts or restarts. Unpickled in the worker (uvicorn spawns them), it becomes a socket
    of that worker's own, bound to the address with SO_REUSEPORT: the kernel then spreads new
    connections over the workers (by a hash of each connection's addresses). With the one
    shared socket uvicorn binds, whichever worker wakes first takes every connection waiting,
    and clients that keep their connections open (a BFF's pool, a proxy) all stayed on one
    worker: 16 keep-alive connections, 16 to 0."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port

    def __reduce__(self) -> tuple[Callable[[str, int], socket], tuple[str, int]]:
        return reuse_port_socket, (self.host, self.port)


def reuse_port_socket(host: str, port: int) -> socket:
    # IPPROTO_TCP named, as uvicorn does: asyncio sets TCP_NODELAY on accepted connections
    # only for sockets that say so (else Nagle's algorithm held answers up to 40 ms).
    sock = socket(AF_INET6 if ":" in host else AF_INET, SOCK_STREAM, IPPROTO_TCP)
    sock.setsockopt(SOL_SOCKET, SO_REUSEADDR, 1)
    sock.setsockopt(SOL_SOCKET, SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def reserve_port(host: str, port: int) -> socket:
    """The parent's hold on the address while workers come and go: a socket bound with
    SO_REUSEPORT that never listens (so no connection is queued on it). Binding it without
    that option first fails if anything else has the port, another `serve` included."""
    with socket(AF_INET6 if ":" in host else AF_INET, SOCK_STREAM) as probe:
        probe.setsockopt(SOL_SOCKET, SO_REUSEADDR, 1)
        probe.bind((host, port))
        port = probe.getsockname()[1]  # port 0: the one the system chose, for every worker
    return reuse_port_socket(host, port)
