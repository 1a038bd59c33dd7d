"""`serve --workers N`'s parent process: uvicorn's process manager (`Multiprocess`), which
replaces a worker that dies or hangs, restarts them all on SIGHUP (each replacement ready
before the one it replaces stops), adds one on SIGTTIN and removes one on SIGTTOU. Here it
also tells the metrics when a worker has exited (uvicorn has no hook for that), and keeps
what stopped it: the signal, or a worker that could not start."""

from __future__ import annotations

import signal
from collections.abc import Callable
from socket import socket

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
