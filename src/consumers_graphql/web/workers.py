"""`serve --workers N`'s parent process: uvicorn's process manager (`Multiprocess`), which
replaces a worker that dies or hangs, restarts them all on SIGHUP (each replacement ready
before the one it replaces stops), adds one on SIGTTIN and removes one on SIGTTOU. Here it
also tells the metrics when a worker has exited (uvicorn has no hook for that), and keeps
what stopped it: the signal, or a worker that could not start. Every worker listens on a
socket of its own (`OwnSocket`, CONSUMERS_WORKER_SOCKETS=own) or on the one the parent
listens on (`shared_socket`, shared).

Two timeouts: a running worker must answer the health ping within uvicorn's 5 s (a stuck
one is replaced, and the parent's signal handling, SIGTERM included, waits at most that per
worker); a new worker of a SIGHUP restart may take `startup_s` to be serving (importing and
building the app on a busy machine takes longer than 5 s)."""

from __future__ import annotations

import logging
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

from consumers_graphql.errors import ConfigurationError
from consumers_graphql.web import metrics

logger = logging.getLogger("uvicorn.error")


class Workers(Multiprocess):
    def __init__(self, config: Config, sockets: list[socket], startup_s: float) -> None:
        super().__init__(config, sockets)
        self.startup_s = startup_s
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

    def restart_all(self) -> None:
        """uvicorn's, but a replacement has `startup_s` (not the ping's timeout) to be
        serving, and one that is not is reaped like any worker (its metrics closed)."""
        for index, old in enumerate(self.processes):
            if self.should_exit.is_set():
                return
            new = Process(self.config, self.sockets)
            new.start()
            if not new.wait_until_ready(self.startup_s, self.should_exit):
                new.kill()
                new.join()
                # its metrics closed; not a start-up failure of the parent's: the old
                # workers go on serving
                if new.pid is not None and new.pid not in self._exited:
                    self._exited.add(new.pid)
                    metrics.child_exited(new.pid)
                if not self.should_exit.is_set():
                    logger.error("New child process [%s] was not ready in time; keeping worker "
                                 "[%s] and aborting the restart.", new.pid, old.pid)
                return
            old.terminate()
            old.join()
            self.processes[index] = new

    def _reaping(self, step: Callable[[], None]) -> None:
        before: list[Process] = list(self.processes)
        try:
            step()
        finally:
            for process in before:
                self._reaped(process)

    def _reaped(self, process: Process) -> None:
        pid, code = process.pid, process.exitcode
        if pid is None or code is None or pid in self._exited:
            return
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


def reuse_port_socket(host: str, port: int, *, reuse_address: bool = True) -> socket:
    # IPPROTO_TCP named, as uvicorn does: asyncio sets TCP_NODELAY on accepted connections
    # only for sockets that say so (else Nagle's algorithm held answers up to 40 ms).
    sock = socket(AF_INET6 if ":" in host else AF_INET, SOCK_STREAM, IPPROTO_TCP)
    if reuse_address:  # a worker's: binds over the TIME_WAITs of earlier connections
        sock.setsockopt(SOL_SOCKET, SO_REUSEADDR, 1)
    sock.setsockopt(SOL_SOCKET, SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def check_address(host: str, port: int) -> int:
    """Binds a socket to the address and closes it: a ConfigurationError (exit 2) if
    anything else holds the port (a listening socket, another `serve`'s reserved one) or the
    host does not resolve. The port bound (port 0: the one the system chose).

    SO_REUSEADDR only (uvicorn sets it too): it binds over TIME_WAITs, and over a socket
    that also has it and does not listen; hence no SO_REUSEADDR on `reserve_port`'s."""
    try:
        with socket(AF_INET6 if ":" in host else AF_INET, SOCK_STREAM) as probe:
            probe.setsockopt(SOL_SOCKET, SO_REUSEADDR, 1)
            probe.bind((host, port))
            bound: int = probe.getsockname()[1]
            return bound
    except OSError as error:
        raise _unusable(host, port, error) from error


def reserve_port(host: str, port: int) -> socket:
    """The parent's hold on the address while workers come and go (CONSUMERS_WORKER_SOCKETS
    =own): a socket bound with SO_REUSEPORT alone that never listens (so no connection is
    queued on it). Workers bind beside it (SO_REUSEPORT, same user); another `serve`'s
    `check_address` cannot (a held address without SO_REUSEADDR refuses it), even before
    any worker listens."""
    port = check_address(host, port)
    try:
        return reuse_port_socket(host, port, reuse_address=False)
    except OSError:
        pass
    # Connections of a server without SO_REUSEPORT (a single-process `serve`, or shared
    # sockets) in TIME_WAIT on the port refuse that bind for up to a minute: bind as workers
    # do, and another `serve` started before these workers listen is not refused.
    logger.warning("Port %d has connections in TIME_WAIT from a server without SO_REUSEPORT: "
                   "another serve on it is refused only once the workers listen.", port)
    try:
        return reuse_port_socket(host, port)
    except OSError as error:  # taken between the check and here
        raise _unusable(host, port, error) from error


def shared_socket(host: str, port: int, backlog: int) -> socket:
    """CONSUMERS_WORKER_SOCKETS=shared: the parent listens, every worker accepts on that
    one socket (uvicorn's default)."""
    port = check_address(host, port)
    sock = socket(AF_INET6 if ":" in host else AF_INET, SOCK_STREAM, IPPROTO_TCP)
    try:
        sock.setsockopt(SOL_SOCKET, SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError as error:
        sock.close()
        raise _unusable(host, port, error) from error
    sock.set_inheritable(True)
    return sock


def _unusable(host: str, port: int, error: OSError) -> ConfigurationError:
    return ConfigurationError(
        f"Cannot listen on {host}:{port} ({error.strerror or error}): set "
        "CONSUMERS_HOST / CONSUMERS_PORT (or --host / --port) to a free address.")
