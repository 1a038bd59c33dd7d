"""Prometheus metrics: a placeholder with the two hooks `serve --workers N` calls; the metrics
helper replaces this file (web/metrics.py with prometheus-client's multiprocess mode)."""

from __future__ import annotations

from consumers_graphql.settings import Settings


def setup_parent(settings: Settings) -> None:
    """Called by `serve`'s parent process once, before any worker starts (with one worker,
    the serving process itself): where the workers' metrics are to be collected."""


def child_exited(pid: int) -> None:
    """Called by `serve --workers N`'s parent when the worker ``pid`` has exited (replaced,
    restarted on SIGHUP, or stopped): its live gauges no longer count."""
