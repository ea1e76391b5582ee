"""Progress reports of the running python effect: what ``effectd.progress(...)`` calls.

A python effect runs in a thread of a worker; while it runs, the worker's python kind installs a
hook here that forwards each report to the daemon. Outside an effect there is no hook and a report
is a no-op. This module imports nothing of effectd, so the package root can re-export
:func:`progress` without importing the daemon.
"""

from __future__ import annotations

from collections.abc import Callable

ProgressHook = Callable[[float | None, str | None], None]
MAX_PROGRESS_MESSAGE = 4096
"""Characters of a progress message kept (the rest is cut)."""

_hook: ProgressHook | None = None


def install_hook(hook: ProgressHook | None) -> None:
    """Route reports to ``hook`` (None: drop them). Only the worker's python kind calls this."""
    global _hook
    _hook = hook


def progress(fraction: float | None = None, message: str | None = None) -> None:
    """Report progress of the running python effect (a no-op outside one).

    ``fraction`` is between 0 and 1; ``message`` a short line. ``effectctl status`` shows the
    latest report and every report is published on the effect's stream as a ``progress`` event.
    """
    if fraction is not None:
        fraction = min(1.0, max(0.0, float(fraction)))
    hook = _hook
    if hook is not None:
        hook(fraction, None if message is None else str(message)[:MAX_PROGRESS_MESSAGE])
