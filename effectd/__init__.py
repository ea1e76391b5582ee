"""effectd: a local daemon that runs effects (shell commands, Python functions, timers) in the
background, journals every lifecycle event durably and streams their output exactly.

Inside a python effect, :func:`progress` reports progress to whoever watches the effect.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "progress"]


def progress(fraction: float | None = None, message: str | None = None) -> None:
    """Report progress of the running python effect (a no-op outside one).

    ``fraction`` is between 0 and 1; ``message`` a short line. ``effectctl status`` shows the
    latest report and every report is published on the effect's stream as a ``progress`` event.
    """
    from effectd.daemon.runners import report_progress

    if fraction is not None:
        fraction = min(1.0, max(0.0, float(fraction)))
    report_progress(fraction, None if message is None else str(message)[:4096])
